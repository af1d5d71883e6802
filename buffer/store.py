"""EpisodeStore: the one class rollout workers and the trainer use to reach the buffer.

Both sides talk to Redis directly (no Ray actor in the data path): Redis is already a
shared server, an actor would add a hop and a single point of failure, and a direct client
survives the crash of any other process. All state lives in Redis under
`physarum:{namespace}:` (see keys.py); a store object only caches script handles and which
entries it has handed out, so any number of stores in any number of processes may share a
namespace, and a restarted process simply opens a new one.

Crash semantics: a prompt whose worker dies returns to the queue when its lease expires,
and a push after that is refused, so each prompt group enters the stream once per epoch;
a group leaves the stream only when the trainer acknowledges it after checkpointing the step
that used it, so a trainer crash replays exactly the unacknowledged groups.

The client is synchronous (redis-py + hiredis, thread-safe connection pool); asyncio code
calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis

from buffer.dataset import LoadReport, OnBadRow
from buffer.episode import EpisodeGroup
from buffer.group_stream import GroupStream, TakenGroup
from buffer.group_writer import GroupWriter
from buffer.keys import Keys
from buffer.prompt_queue import Lease, PromptQueue
from buffer.resp import FastPacker
from buffer.stats import BufferStats, collect

if TYPE_CHECKING:
    from configs.services import BufferConfig

logger = logging.getLogger(__name__)


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for a redis:// or rediss:// URL (password in the URL if any)."""
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"url: expected redis://, rediss:// or unix://, got {url!r}")
    kwargs.setdefault("socket_connect_timeout", 10.0)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("health_check_interval", 30)
    kwargs.setdefault("command_packer", FastPacker())  # see buffer/resp.py
    return redis.Redis.from_url(url, **kwargs)


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


class EpisodeStore:
    """Prompts, leases, episode groups, the policy version and stats of one job namespace.

    capacity       unconsumed (not yet taken) groups at which put_group waits
    max_staleness  take_groups hands out groups whose oldest version >= current - this
    lease_seconds  default lease duration
    put_timeout_s  how long put_group waits for room before raising BufferFullError
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        capacity: int = 64,
        max_staleness: int = 1,
        lease_seconds: float = 60.0,
        put_timeout_s: float = 600.0,
    ) -> None:
        self.keys = Keys.for_namespace(namespace)
        self.namespace = namespace
        self._r = connect(url)
        try:
            self._prompts = PromptQueue(self._r, self.keys, lease_seconds)
            self._writer = GroupWriter(
                self._r,
                self.keys,
                capacity=capacity,
                put_timeout_s=put_timeout_s,
                renew=self._prompts.renew,
            )
            self._groups = GroupStream(self._r, self.keys, max_staleness=max_staleness)
        except redis.ConnectionError as exc:
            self._r.close()
            raise redis.ConnectionError(
                f"buffer: cannot reach Redis at {redact(url)} ({exc}); is the server up, and "
                "are the host, port and password in the URL right?"
            ) from exc
        except Exception:
            self._r.close()
            raise

    @classmethod
    def from_config(
        cls, url: str, namespace: str, cfg: BufferConfig, *, lease_seconds: float = 60.0
    ) -> EpisodeStore:
        """A store for `url` (already resolved: cfg.url or the embedded server's URL)."""
        return cls(
            url,
            namespace,
            capacity=cfg.capacity,
            max_staleness=cfg.max_staleness,
            lease_seconds=lease_seconds,
            put_timeout_s=cfg.put_timeout_s,
        )

    @property
    def client(self) -> redis.Redis:
        """The underlying redis-py client (for diagnostics and tests)."""
        return self._r

    @property
    def capacity(self) -> int:
        return self._writer.capacity

    @property
    def max_staleness(self) -> int:
        return self._groups.max_staleness

    # ---- prompts ----------------------------------------------------------------------

    def load_prompts(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        shuffle: bool = True,
        on_bad_row: OnBadRow = "skip",
        required_keys: Sequence[str] = ("id", "messages"),
        max_epochs: int | None = None,
    ) -> LoadReport:
        """Load a JSONL or Parquet dataset into this namespace (idempotent; see PromptQueue).

        on_bad_row="skip" counts bad rows (their line numbers are in report.errors);
        "fail" raises DatasetError at the first one. max_epochs=None leases forever.
        """
        return self._prompts.load(
            path,
            seed=seed,
            shuffle=shuffle,
            on_bad_row=on_bad_row,
            required_keys=required_keys,
            max_epochs=max_epochs,
        )

    def lease_prompts(
        self, worker_id: str, k: int, *, lease_seconds: float | None = None
    ) -> list[Lease]:
        """Lease up to k prompts (requeueing expired leases first); [] once all epochs ran."""
        return self._prompts.lease(worker_id, k, lease_seconds)

    def renew_lease(self, lease_id: str, lease_seconds: float | None = None) -> float | None:
        """Extend a lease; returns the new deadline (server time) or None if it is gone."""
        return self._prompts.renew(lease_id, lease_seconds)

    def release_lease(self, lease_id: str, done: bool = False) -> bool:
        """End a lease without a push. done=False: the prompt goes back to the front of the
        queue (unused). done=True: the prompt counts as handled for this epoch (e.g. a group
        dropped by dynamic sampling) and is not served again. False if the lease was gone."""
        return self._prompts.release(lease_id, done)

    def requeue_expired(self) -> int:
        """Return every lease past its deadline to the queue; returns how many."""
        return self._prompts.requeue_expired()

    # ---- episode groups ---------------------------------------------------------------

    def put_group(
        self,
        group: EpisodeGroup,
        *,
        lease_id: str | None = None,
        cancel: threading.Event | None = None,
    ) -> str | None:
        """Append a group to the stream, completing its lease in the same atomic step.

        Returns the stream entry id (the same id again if this lease was already pushed),
        or None if the lease had expired and its prompt was requeued (a late push, counted).
        Waits while the buffer is at capacity, renewing the lease meanwhile; raises
        BufferFullError after put_timeout_s and LeaseMismatchError if the lease is for a
        different prompt. Setting `cancel` (from any thread) ends a wait for room at once
        with PutCancelledError; the lease is then still held. Calls from several threads
        share round trips (each push still its own atomic step; see group_writer.py).
        """
        return self._writer.put_one(group, lease_id, self._prompts.lease_seconds, cancel)

    def put_groups(
        self,
        groups: Sequence[EpisodeGroup],
        lease_ids: Sequence[str | None] | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[str | None]:
        """put_group for several groups in one round trip (each push still atomic on its own).

        Returns one entry id (or None for a late push) per group, in order. If the buffer has
        room for only some, those are pushed and the rest wait as in put_group; `cancel` ends
        that wait as in put_group (PutCancelledError carries the results so far).
        """
        lease_ids = [None] * len(groups) if lease_ids is None else list(lease_ids)
        if len(lease_ids) != len(groups):
            raise ValueError(f"lease_ids: {len(lease_ids)} given for {len(groups)} groups")
        items = list(zip(groups, lease_ids))
        return self._writer.put_many(items, self._prompts.lease_seconds, cancel)

    def take_groups(self, consumer: str, n: int, *, block_ms: int = 1000) -> list[TakenGroup]:
        """Up to n groups fresh enough for the current version, waiting up to block_ms.

        A consumer's own unacknowledged entries from an earlier process come first. Stale
        groups are acknowledged and dropped, undecodable ones quarantined; both counted.
        """
        return self._groups.take(consumer, n, block_ms)

    def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge groups once the step that used them is checkpointed."""
        self._groups.ack(list(entry_ids))

    def reclaim(self, consumer: str, min_idle_ms: int) -> int:
        """Claim pending groups idle >= min_idle_ms for `consumer`; they come with its next take."""
        return self._groups.reclaim(consumer, min_idle_ms)

    # ---- versions and stats -----------------------------------------------------------

    def set_version(self, v: int) -> None:
        """Record the current policy version (the trainer calls this after each step)."""
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"version: expected an int >= 0, got {v!r}")
        self._r.set(self.keys.version, v)

    def get_version(self) -> int:
        return int(self._r.get(self.keys.version) or 0)

    def stats(self) -> BufferStats:
        return collect(self._r, self.keys)

    def drops_and_version(self) -> tuple[int, int]:
        """stats().drops_stale and stats().version in one round trip of two reads (a
        producer reads them once per weight update; stats() is 12 commands and a second
        round trip)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self.keys.stats, "drops_stale")
        pipe.get(self.keys.version)
        drops, version = pipe.execute()
        return int(drops or 0), int(version or 0)

    def ping(self) -> bool:
        return bool(self._r.ping())

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
