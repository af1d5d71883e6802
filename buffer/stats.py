"""A snapshot of the buffer's state and counters, read in one pipelined round trip (+1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from buffer.keys import CONSUMER_GROUP, Keys


@dataclass
class BufferStats:
    """Buffer state of one namespace. Counters are cumulative since the namespace was created.

    groups_unconsumed  groups in the stream not yet taken by any consumer; backpressure
                       holds producers while this is >= capacity (Redis calls it the lag)
    groups_pending     taken by a consumer and not yet acknowledged
    lag_versions       current version minus the oldest version of the next group to be
                       taken (how stale the head of the queue is); None if nothing waits
    staleness_hist     staleness (current - oldest version) -> groups handed to consumers
    dropped_hist       staleness -> groups dropped as older than max_staleness allows
    """

    version: int = 0
    epoch: int = 0
    cursor: int = 0
    prompts_total: int = 0
    prompts_queued: int = 0
    prompts_leased: int = 0
    prompts_done: int = 0
    prompts_filtered: int = 0
    groups_put: int = 0
    groups_unconsumed: int = 0
    groups_pending: int = 0
    groups_acked: int = 0
    lag_versions: int | None = None
    drops_stale: int = 0
    stale_requeued: int = 0  # prompts of dropped groups sent back to be generated again
    corrupt: int = 0
    late_pushes: int = 0
    lease_expiries: int = 0
    bad_rows: int = 0
    staleness_hist: dict[int, int] = field(default_factory=dict)
    dropped_hist: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COUNTERS = (
    "prompts_done",
    "prompts_filtered",
    "groups_put",
    "groups_acked",
    "drops_stale",
    "stale_requeued",
    "corrupt",
    "late_pushes",
    "lease_expiries",
    "bad_rows",
)


def _int_map(raw: dict) -> dict[int, int]:
    """Counts by staleness; a 0 (a take counted and then quarantined) is left out."""
    return dict(sorted((int(k), int(v)) for k, v in raw.items() if int(v)))


def _head_version(client: redis.Redis, keys: Keys, group_info: list[dict]) -> int | None:
    """Oldest version of the first entry after the group's last-delivered id."""
    info = next(
        (g for g in group_info if g["name"] in (CONSUMER_GROUP, CONSUMER_GROUP.encode())), None
    )
    if info is None:
        return None
    last = info["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else last
    head = client.xrange(keys.stream, min=f"({last}", max="+", count=1)
    if not head:
        return None
    oldest = int(head[0][1].get(b"v", -1))
    return oldest if oldest >= 0 else None


def collect(client: redis.Redis, keys: Keys) -> BufferStats:
    """Read every figure of BufferStats for `keys`."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.stats)
    pipe.hgetall(keys.hist_taken)
    pipe.hgetall(keys.hist_dropped)
    pipe.hgetall(keys.cursor)
    pipe.llen(keys.order)
    pipe.llen(keys.retry)
    pipe.hlen(keys.leases)
    pipe.hget(keys.meta, "n")
    pipe.get(keys.version)
    pipe.xlen(keys.stream)
    pipe.xpending(keys.stream, CONSUMER_GROUP)
    pipe.xinfo_groups(keys.stream)
    (
        counters,
        taken,
        dropped,
        cursor,
        order_len,
        retry_len,
        leased,
        total,
        version,
        xlen,
        pending,
        groups,
    ) = pipe.execute()
    counters = {k.decode(): int(v) for k, v in counters.items()}
    pos = int(cursor.get(b"pos", 0))
    version_now = int(version or 0)
    head = _head_version(client, keys, groups)
    return BufferStats(
        version=version_now,
        epoch=int(cursor.get(b"epoch", 0)),
        cursor=pos,
        prompts_total=int(total or 0),
        prompts_queued=max(order_len - pos, 0) + retry_len,
        prompts_leased=leased,
        groups_unconsumed=xlen - pending["pending"],
        groups_pending=pending["pending"],
        lag_versions=None if head is None else version_now - head,
        staleness_hist=_int_map(taken),
        dropped_hist=_int_map(dropped),
        **{name: counters.get(name, 0) for name in _COUNTERS},
    )
