"""The episode side of the buffer: a Redis stream of encoded groups read by a consumer group.

Producers push with `put` (one Lua call: complete the lease, check capacity, XADD). The
trainer reads with `take` (XREADGROUP), which hands back only groups fresh enough for the
current policy version; stale ones are acknowledged and dropped, undecodable ones are moved
to a capped quarantine stream; both are counted, so neither can wedge the trainer. `ack`
(XACK + XDEL in one transaction) is called once the step that used the groups has been
checkpointed. Entries taken but never acknowledged stay pending: a consumer restarted under
the same name gets them again on its next `take`, and `reclaim` moves a dead consumer's
pending entries to a live one (XAUTOCLAIM).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from buffer import scripts
from buffer.codec import EpisodeCodecError, decode_group, encode_group
from buffer.episode import EpisodeGroup
from buffer.keys import CONSUMER_GROUP, Keys

logger = logging.getLogger(__name__)

QUARANTINE_MAXLEN = 1000
_CLAIM_BATCH = 256


class BufferFullError(TimeoutError):
    """put_group waited put_timeout_s while the buffer stayed at capacity."""


class LeaseMismatchError(ValueError):
    """put_group was given a lease for a different prompt than the group's prompt_id."""


@dataclass(frozen=True)
class TakenGroup:
    """A group handed to a consumer; acknowledge `entry_id` after its step is checkpointed."""

    entry_id: str
    group: EpisodeGroup


@dataclass
class _Consumer:
    """What this process has handed out under one consumer name (not yet acknowledged)."""

    handed: set[str] = field(default_factory=set)
    scan_from: str | None = "0"  # where to resume scanning our pending list; None = done


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GroupStream:
    """Episode groups of one namespace, with capacity, staleness and acknowledgement."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        capacity: int,
        max_staleness: int,
        put_timeout_s: float,
        renew: Any,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {max_staleness}")
        if put_timeout_s <= 0:
            raise ValueError(f"put_timeout_s: must be > 0, got {put_timeout_s}")
        self._r = client
        self._k = keys
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.put_timeout_s = put_timeout_s
        self._renew = renew  # callable(lease_id) -> deadline | None, used while blocked
        self._push = client.register_script(scripts.PUSH)
        self._consumers: dict[str, _Consumer] = {}
        self._lock = threading.Lock()
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent)."""
        try:
            self._r.xgroup_create(self._k.stream, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- producing --------------------------------------------------------------------

    def put(self, group: EpisodeGroup, lease_id: str | None, lease_seconds: float) -> str | None:
        """Append a group; see EpisodeStore.put_group."""
        return self.put_many([(group, lease_id)], lease_seconds)[0]

    def _push_args(self, group: EpisodeGroup, lease_id: str | None) -> tuple[list, list]:
        oldest = group.oldest_version
        keys = [self._k.leases, self._k.deadlines, self._k.stream, self._k.stats,
                self._k.done(lease_id or "")]  # fmt: skip
        args = [lease_id or "", group.prompt_id, self.capacity, encode_group(group),
                -1 if oldest is None else oldest, CONSUMER_GROUP]  # fmt: skip
        return keys, args

    def put_many(
        self, items: list[tuple[EpisodeGroup, str | None]], lease_seconds: float
    ) -> list[str | None]:
        """Push several groups in one pipelined round trip per attempt; each push is its own
        atomic step. Returns the entry id (None for a late push) per item, in order."""
        calls = [self._push_args(group, lease_id) for group, lease_id in items]
        results: list[str | None] = [None] * len(items)
        waiting = list(range(len(items)))
        start = last_renew = time.monotonic()
        pause = 0.002
        while True:
            pipe = self._r.pipeline(transaction=False)
            for i in waiting:
                self._push(keys=calls[i][0], args=calls[i][1], client=pipe)
            replies = pipe.execute()
            settle = self._settle
            waiting = [i for i, reply in zip(waiting, replies) if settle(i, reply, items, results)]
            if not waiting:
                return results
            now = time.monotonic()
            if now - start >= self.put_timeout_s:
                raise BufferFullError(
                    f"put_group: the buffer stayed full ({self.capacity} unconsumed groups) "
                    f"for put_timeout_s={self.put_timeout_s:g}s; is the trainer taking groups?"
                )
            if now - last_renew >= lease_seconds / 3:
                for i in waiting:  # waiting on the trainer must not cost a worker its lease
                    if items[i][1]:
                        self._renew(items[i][1])
                last_renew = now
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    @staticmethod
    def _settle(i: int, reply: list, items: list, results: list) -> bool:
        """Record the outcome of push i; True if it must be retried (buffer full)."""
        status = _text(reply[0])
        group, lease_id = items[i]
        if status in ("OK", "DONE"):
            results[i] = _text(reply[1])
        elif status == "LATE":
            logger.warning("late push refused: lease %s of prompt %s expired and was requeued",
                           lease_id, group.prompt_id)  # fmt: skip
        elif status == "MISMATCH":
            raise LeaseMismatchError(
                f"lease_id: {lease_id} leases prompt {_text(reply[1])!r}, not {group.prompt_id!r}"
            )
        return status == "FULL"

    # ---- consuming --------------------------------------------------------------------

    def _consumer(self, name: str) -> _Consumer:
        with self._lock:
            return self._consumers.setdefault(name, _Consumer())

    def _read(self, consumer: str, state: _Consumer, count: int, block_ms: int | None) -> list:
        """Entries not yet handed out: first our own pending list, then new ones."""
        while state.scan_from is not None:
            reply = self._r.xreadgroup(
                CONSUMER_GROUP, consumer, {self._k.stream: state.scan_from}, count=count
            )
            entries = [e for e in (reply[0][1] if reply else [])]
            if not entries:
                state.scan_from = None
                break
            state.scan_from = _text(entries[-1][0])
            fresh = [e for e in entries if _text(e[0]) not in state.handed]
            if fresh:
                return fresh
        reply = self._r.xreadgroup(
            CONSUMER_GROUP, consumer, {self._k.stream: ">"}, count=count, block=block_ms
        )
        return reply[0][1] if reply else []

    def take(self, consumer: str, n: int, block_ms: int) -> list[TakenGroup]:
        """Up to n fresh groups, waiting at most block_ms (0 = do not wait) to fill the batch."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        state = self._consumer(consumer)
        version = int(self._r.get(self._k.version) or 0)
        floor = version - self.max_staleness
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        taken: list[TakenGroup] = []
        while len(taken) < n:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            entries = self._read(consumer, state, n - len(taken), wait_ms if wait_ms > 0 else None)
            if not entries:
                break
            taken += self._sort(entries, version, floor, state)
        return taken

    def _sort(self, entries: list, version: int, floor: int, state: _Consumer) -> list:
        """Decode fresh entries; drop stale and quarantine corrupt ones, all acked in one
        atomic trip. The prompt of a stale group that came from a lease is requeued, so it
        is generated again by a fresher policy instead of being lost for its epoch."""
        fresh: list[TakenGroup] = []
        pipe = self._r.pipeline(transaction=True)
        dropped: list[str] = []
        ages: Counter[int] = Counter()
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            if not fields:  # deleted while pending: nothing to deliver
                dropped.append(entry_id)
                continue
            try:
                oldest = int(fields[b"v"])
                if 0 <= oldest < floor:
                    self._drop_stale(pipe, fields, version - oldest)
                    dropped.append(entry_id)
                    continue
                group = decode_group(fields[b"g"])
            except (EpisodeCodecError, KeyError, ValueError) as exc:
                self._quarantine(pipe, entry_id, fields, exc)
                dropped.append(entry_id)
                continue
            if oldest >= 0:
                ages[version - oldest] += 1
            state.handed.add(entry_id)
            fresh.append(TakenGroup(entry_id, group))
        for age, count in ages.items():
            pipe.hincrby(self._k.hist_taken, age, count)
        if dropped:
            pipe.xack(self._k.stream, CONSUMER_GROUP, *dropped)
            pipe.xdel(self._k.stream, *dropped)
        pipe.execute()
        return fresh

    def _drop_stale(self, pipe: Any, fields: dict, staleness: int) -> None:
        pipe.hincrby(self._k.hist_dropped, staleness, 1)
        pipe.hincrby(self._k.stats, "drops_stale", 1)
        if b"e" in fields:
            pipe.rpush(self._k.retry, b"%s|%s" % (fields[b"e"], fields[b"p"]))
            pipe.hincrby(self._k.stats, "stale_requeued", 1)

    def _quarantine(self, pipe: Any, entry_id: str, fields: dict, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        logger.error("quarantined undecodable entry %s: %s", entry_id, reason)
        pipe.xadd(
            self._k.quarantine,
            {"entry": entry_id, "error": reason, "g": fields.get(b"g", b"")},
            maxlen=QUARANTINE_MAXLEN,
            approximate=True,
        )
        pipe.hincrby(self._k.stats, "corrupt", 1)

    def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete entries (after the step that used them is checkpointed)."""
        if not entry_ids:
            return
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self._k.stream, CONSUMER_GROUP, *entry_ids)
        pipe.xdel(self._k.stream, *entry_ids)
        pipe.hincrby(self._k.stats, "groups_acked", len(entry_ids))
        pipe.execute()
        with self._lock:
            for state in self._consumers.values():
                state.handed.difference_update(entry_ids)

    def reclaim(self, consumer: str, min_idle_ms: int) -> int:
        """Move pending entries idle >= min_idle_ms (any consumer's) to `consumer`.

        They are delivered by that consumer's next take. Choose min_idle_ms above the longest
        time a live consumer holds entries before acking (its checkpoint interval).
        """
        if min_idle_ms < 0:
            raise ValueError(f"min_idle_ms: must be >= 0, got {min_idle_ms}")
        state = self._consumer(consumer)
        start, claimed = "0-0", 0
        while True:
            # (not JUSTID: redis-py drops the cursor from JUSTID replies)
            reply = self._r.xautoclaim(
                self._k.stream,
                CONSUMER_GROUP,
                consumer,
                min_idle_ms,
                start_id=start,
                count=_CLAIM_BATCH,
            )
            start = _text(reply[0])
            claimed += sum(1 for entry in reply[1] if _text(entry[0]) not in state.handed)
            if start == "0-0":
                break
        state.scan_from = "0"
        if claimed:
            logger.info("consumer %s reclaimed %d pending groups", consumer, claimed)
        return claimed
