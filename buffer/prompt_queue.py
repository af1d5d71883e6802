"""The prompt side of the buffer: a dataset in Redis, an epoch cursor, and leases.

Prompts are stored once per namespace (`load_prompts` is idempotent). Each epoch has its own
order (a seeded shuffle of the file order, identical on every worker) and a persisted
cursor (epoch, pos). A worker leases k prompts with a deadline; leases that pass their
deadline are put back by `requeue_expired` (every lease call runs it first), and expired or
released prompts are served before the cursor moves on. Completing a lease happens in the
push script of the group stream, atomically with the push.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from buffer import scripts
from buffer.dataset import LoadReport, OnBadRow, ParsedDataset, parse_dataset
from buffer.keys import Keys

logger = logging.getLogger(__name__)

REQUEUE_BATCH = 1000  # leases requeued per script call (bounds the script's run time)
_CHUNK = 5000  # rows per HSET/RPUSH inside the load transaction


class DatasetMismatchError(ValueError):
    """The namespace already holds a different dataset (or seed/shuffle) than the one given."""


class NoDatasetError(RuntimeError):
    """Prompts were leased from a namespace into which no dataset was loaded."""


@dataclass(frozen=True)
class Lease:
    """Prompt `prompt_id` (its dataset row in `row`) leased until `deadline` (server time, s)."""

    lease_id: str
    prompt_id: str
    row: dict[str, Any] = field(repr=False)
    deadline: float
    epoch: int


def epoch_order(ids: Sequence[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The order of `ids` in `epoch`: a permutation seeded by (seed, epoch), or file order."""
    if not shuffle:
        return list(ids)
    perm = np.random.default_rng([seed, epoch]).permutation(len(ids))
    return [ids[i] for i in perm]


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class PromptQueue:
    """Prompts, cursor and leases of one namespace. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, keys: Keys, lease_seconds: float) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds: must be > 0, got {lease_seconds}")
        self._r = client
        self._k = keys
        self.lease_seconds = float(lease_seconds)
        self._lease = client.register_script(scripts.LEASE)
        self._advance = client.register_script(scripts.ADVANCE_EPOCH)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._requeue = client.register_script(scripts.REQUEUE)

    # ---- loading ----------------------------------------------------------------------

    def load(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        shuffle: bool = True,
        on_bad_row: OnBadRow = "skip",
        required_keys: Sequence[str] = ("id", "messages"),
        max_epochs: int | None = None,
    ) -> LoadReport:
        """Load the dataset once per namespace; a repeat load of the same file is a no-op."""
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"max_epochs: must be >= 1 or None (unlimited), got {max_epochs}")
        parsed = parse_dataset(path, on_bad_row=on_bad_row, required_keys=required_keys)
        identity = {"fingerprint": parsed.fingerprint, "seed": str(seed), "shuffle": str(shuffle)}
        result: dict[str, LoadReport] = {}

        def transact(pipe: redis.client.Pipeline) -> None:
            meta = {_text(k): _text(v) for k, v in pipe.hgetall(self._k.meta).items()}
            if meta:
                result["report"] = self._existing(meta, identity, parsed)
                pipe.multi()
            else:
                pipe.multi()
                self._write(pipe, parsed, identity, seed, shuffle)
                result["report"] = parsed.report
            pipe.hset(self._k.meta, "max_epochs", "" if max_epochs is None else max_epochs)

        self._r.transaction(transact, self._k.meta)
        report = result["report"]
        logger.info(
            "prompts %s: %d loaded, %d skipped%s",
            report.path,
            report.n_loaded,
            report.n_skipped,
            " (already loaded)" if report.already_loaded else "",
        )
        return report

    def _existing(self, meta: dict, identity: dict, parsed: ParsedDataset) -> LoadReport:
        differs = {k: (meta.get(k), v) for k, v in identity.items() if meta.get(k) != v}
        if differs:
            raise DatasetMismatchError(
                f"namespace {self._k.namespace!r} already holds dataset {meta.get('path')} "
                f"with different {sorted(differs)} (stored vs given: {differs}); use a new "
                "namespace for a different dataset"
            )
        stored = LoadReport(**json.loads(meta["report"]))
        stored.already_loaded = True
        return stored

    def _write(
        self, pipe: Any, parsed: ParsedDataset, identity: dict, seed: int, shuffle: bool
    ) -> None:
        k = self._k
        pipe.delete(k.rows, k.ids, k.order, k.cursor, k.retry)
        for i in range(0, len(parsed.ids), _CHUNK):
            chunk = dict(zip(parsed.ids[i : i + _CHUNK], parsed.rows[i : i + _CHUNK]))
            pipe.hset(k.rows, mapping=chunk)
            pipe.rpush(k.ids, *parsed.ids[i : i + _CHUNK])
        order = epoch_order(parsed.ids, seed, 0, shuffle)
        for i in range(0, len(order), _CHUNK):
            pipe.rpush(k.order, *order[i : i + _CHUNK])
        pipe.hset(k.cursor, mapping={"epoch": 0, "pos": 0})
        report = json.dumps(parsed.report.__dict__)
        pipe.hset(
            k.meta,
            mapping={
                **identity,
                "path": parsed.report.path,
                "n": len(parsed.ids),
                "report": report,
            },
        )
        pipe.hset(k.stats, "bad_rows", parsed.report.n_skipped)

    # ---- leases -----------------------------------------------------------------------

    def lease(self, worker_id: str, k: int, lease_seconds: float | None = None) -> list[Lease]:
        """Lease up to k prompts; start the next epoch when this one runs dry.

        Returns fewer than k (possibly none) only when the last epoch is fully leased;
        prompts still leased by others may come back later through requeue_expired.
        """
        if k < 1:
            raise ValueError(f"k: must be >= 1, got {k}")
        seconds = self.lease_seconds if lease_seconds is None else float(lease_seconds)
        if seconds <= 0:
            raise ValueError(f"lease_seconds: must be > 0, got {seconds}")
        keys = self._k
        script_keys = [
            keys.order,
            keys.cursor,
            keys.retry,
            keys.leases,
            keys.deadlines,
            keys.stats,
            keys.rows,
            keys.lease_seq,
        ]
        leases: list[Lease] = []
        while len(leases) < k:
            granted, epoch, at_end = self._lease(
                keys=script_keys, args=[k - len(leases), worker_id, seconds, REQUEUE_BATCH]
            )
            leases += [self._to_lease(item) for item in granted]
            if len(leases) >= k or not at_end or not self._next_epoch(int(epoch)):
                break
        return leases

    @staticmethod
    def _to_lease(item: list[Any]) -> Lease:
        lease_id, prompt_id, deadline, epoch, row = item
        return Lease(
            lease_id=_text(lease_id),
            prompt_id=_text(prompt_id),
            row=json.loads(row) if row is not None else {},
            deadline=float(deadline),
            epoch=int(epoch),
        )

    def _next_epoch(self, epoch: int) -> bool:
        """Install epoch+1's order unless max_epochs is reached; False if nothing to lease."""
        meta = {_text(k): _text(v) for k, v in self._r.hgetall(self._k.meta).items()}
        if not meta:
            raise NoDatasetError(
                f"namespace {self._k.namespace!r} has no prompts; call load_prompts first"
            )
        max_epochs = int(meta["max_epochs"]) if meta.get("max_epochs") else None
        if int(meta["n"]) == 0 or (max_epochs is not None and epoch + 1 >= max_epochs):
            return False
        ids = [_text(x) for x in self._r.lrange(self._k.ids, 0, -1)]
        order = epoch_order(ids, int(meta["seed"]), epoch + 1, meta["shuffle"] == "True")
        installed = self._advance(keys=[self._k.order, self._k.cursor], args=[epoch, *order])
        if installed:
            logger.info("namespace %s: epoch %d started", self._k.namespace, epoch + 1)
        return True  # installed by us or by a concurrent worker: lease again either way

    def renew(self, lease_id: str, lease_seconds: float | None = None) -> float | None:
        """Push the deadline out; returns the new deadline, or None if the lease is gone."""
        seconds = self.lease_seconds if lease_seconds is None else float(lease_seconds)
        deadline = self._renew(keys=[self._k.leases, self._k.deadlines], args=[lease_id, seconds])
        return float(deadline) if deadline is not None else None

    def release(self, lease_id: str, done: bool = False) -> bool:
        """End a lease without a push: requeue its prompt at the front (done=False) or count
        it as handled for this epoch (done=True). False if the lease was gone."""
        keys = [self._k.leases, self._k.deadlines, self._k.retry, self._k.stats]
        return bool(self._release(keys=keys, args=[lease_id, int(bool(done))]))

    def requeue_expired(self) -> int:
        """Put every lease past its deadline back in the queue; returns how many."""
        keys = [self._k.leases, self._k.deadlines, self._k.retry, self._k.stats]
        total = 0
        while True:
            n = int(self._requeue(keys=keys, args=[REQUEUE_BATCH]))
            total += n
            if n < REQUEUE_BATCH:
                return total
