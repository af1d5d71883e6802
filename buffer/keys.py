"""Redis key names of one buffer namespace.

Every key is `physarum:{NAMESPACE}:<name>`. The braces are literal: they make the namespace
a Redis Cluster hash tag, so all keys of one job live in one slot and the Lua scripts that
touch several of them stay legal on a cluster too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
CONSUMER_GROUP = "trainer"


@dataclass(frozen=True)
class Keys:
    """All key names for `namespace`; see each field for the Redis type and content."""

    namespace: str
    prefix: str
    rows: str  # HASH   prompt id -> row JSON
    ids: str  # LIST   prompt ids in file order (the base of every epoch's shuffle)
    order: str  # LIST   this epoch's prompt order
    cursor: str  # HASH   epoch, pos (next index into `order`)
    meta: str  # HASH   fingerprint, path, seed, shuffle, max_epochs, n, report
    retry: str  # LIST   "epoch|prompt id" of expired or released leases, served first
    leases: str  # HASH   lease id -> {"p": prompt id, "w": worker, "e": epoch}
    deadlines: str  # ZSET   lease id -> deadline (server time, seconds)
    lease_seq: str  # STRING counter for lease ids
    stream: str  # STREAM episode groups: r = payload token, v = oldest version, p = prompt id,
    #                    e = epoch (groups pushed under a lease)
    quarantine: str  # STREAM undecodable records with the error (capped)
    version: str  # STRING current policy version
    stats: str  # HASH   counters (see stats.py)
    hist_taken: str  # HASH   staleness -> groups handed to the trainer
    hist_dropped: str  # HASH   staleness -> groups dropped as too stale

    @classmethod
    def for_namespace(cls, namespace: str) -> Keys:
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise ValueError(
                f"namespace: {namespace!r} must be 1-128 characters of letters, digits, "
                "'_', '.', ':' or '-', starting with a letter or digit"
            )
        prefix = f"physarum:{{{namespace}}}:"
        names = [n for n in cls.__dataclass_fields__ if n not in ("namespace", "prefix")]
        return cls(namespace=namespace, prefix=prefix, **{n: prefix + n for n in names})

    def payload(self, token: str) -> str:
        """STRING the encoded record of the stream entry whose `r` field is `token`."""
        return f"{self.prefix}g:{token}"

    @property
    def payload_prefix(self) -> str:
        return f"{self.prefix}g:"

    def done(self, lease_id: str) -> str:
        """STRING "entry id|prompt id" of a completed lease's push (expires after an hour)."""
        return f"{self.prefix}done:{lease_id}"
