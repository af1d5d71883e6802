"""The consuming side of the episode stream: the trainer's consumer group.

`take` reads the policy version and entries in one round trip (GET + XREADGROUP), then in a
second one (MULTI: drops, MGET of the payloads, staleness counts, EXEC) fetches the payloads
and hands back only groups fresh enough for the current policy version; stale ones are
acknowledged and dropped (their leased prompts requeued), undecodable ones are moved to a
capped quarantine stream (a third trip, only when there are any); all counted, so neither
can wedge the trainer. `ack` (one Lua step: XACK + XDEL + payload
delete) is called once the step that used the groups has been checkpointed. Entries taken
but never acknowledged stay pending: a consumer restarted under the same name gets them
again on its next `take`, and `reclaim` moves a dead consumer's pending entries to a live
one (XAUTOCLAIM). Producing is in group_writer.py.
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
from buffer.codec import EpisodeCodecError, decode_group
from buffer.episode import EpisodeGroup
from buffer.keys import CONSUMER_GROUP, Keys

logger = logging.getLogger(__name__)

QUARANTINE_MAXLEN = 1000
_CLAIM_BATCH = 256


@dataclass(frozen=True)
class TakenGroup:
    """A group handed to a consumer; acknowledge `entry_id` after its step is checkpointed."""

    entry_id: str
    group: EpisodeGroup


@dataclass
class _Consumer:
    """What this process has handed out under one consumer name (not yet acknowledged)."""

    handed: set[str] = field(default_factory=set)
    tokens: dict[str, str] = field(default_factory=dict)  # handed entry id -> payload token
    scan_from: str | None = "0"  # where to resume scanning our pending list; None = done


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(reply: Any) -> list[tuple[bytes, dict | None]]:
    """(entry id, fields) of a raw XREADGROUP reply on one stream (a map under RESP3, a list
    of [stream, entries] under RESP2; None when nothing came), as redis-py's callback would
    give them: fields is {} for an entry deleted while pending."""
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    out: list[tuple[bytes, dict | None]] = []
    for entry in entries:
        if entry is None:
            out.append((None, None))  # type: ignore[arg-type]  # as redis-py's parser
            continue
        flat = entry[1] or ()
        out.append((entry[0], dict(zip(flat[::2], flat[1::2]))))
    return out


class GroupStream:
    """The trainer side of one namespace's episode stream: take, ack, reclaim, staleness."""

    def __init__(self, client: redis.Redis, keys: Keys, *, max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {max_staleness}")
        self._r = client
        self._k = keys
        self.max_staleness = max_staleness
        self._ack = client.register_script(scripts.ACK)
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

    def _consumer(self, name: str) -> _Consumer:
        with self._lock:
            return self._consumers.setdefault(name, _Consumer())

    def _read(
        self, consumer: str, state: _Consumer, count: int, block_ms: int | None
    ) -> tuple[int, list]:
        """The current version and entries not yet handed out: first our own pending list,
        then new ones (the version comes in the same round trip as the read)."""
        while state.scan_from is not None:
            version, entries = self._xreadgroup(consumer, state.scan_from, count, None)
            if not entries:
                state.scan_from = None
                break
            state.scan_from = _text(entries[-1][0])
            fresh = [e for e in entries if _text(e[0]) not in state.handed]
            if fresh:
                return version, fresh
        return self._xreadgroup(consumer, ">", count, block_ms)

    def _xreadgroup(
        self, consumer: str, start: str, count: int, block_ms: int | None
    ) -> tuple[int, list]:
        """GET version + XREADGROUP in one trip, as raw commands (a bytes command name has
        no redis-py response callback: the reply is parsed here, once, by _entries)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.execute_command(b"GET", self._k.version)
        block = () if block_ms is None else (b"BLOCK", block_ms)
        pipe.execute_command(b"XREADGROUP", b"GROUP", CONSUMER_GROUP, consumer, b"COUNT",
                             count, *block, b"STREAMS", self._k.stream, start)  # fmt: skip
        version, reply = pipe.execute()
        return int(version or 0), _entries(reply)

    def take(self, consumer: str, n: int, block_ms: int) -> list[TakenGroup]:
        """Up to n fresh groups, waiting at most block_ms (0 = do not wait) to fill the batch.

        Staleness is judged against the version read with the first batch of entries."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        state = self._consumer(consumer)
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        taken: list[TakenGroup] = []
        version: int | None = None
        while len(taken) < n:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            read_version, entries = self._read(
                consumer, state, n - len(taken), wait_ms if wait_ms > 0 else None
            )
            version = read_version if version is None else version
            if not entries:
                break
            taken += self._sort(entries, version, version - self.max_staleness, state)
        return taken

    def _sort(self, entries: list, version: int, floor: int, state: _Consumer) -> list:
        """Decode fresh entries; drop stale and quarantine corrupt ones. One atomic trip
        (MULTI) drops the stale and malformed entries, fetches the payloads and counts the
        staleness of the groups to hand out; a second one, only if some payload does not
        decode, quarantines those and takes them out of the count. The prompt of a stale
        group that came from a lease is requeued, so a fresher policy generates it again
        instead of it being lost for its epoch."""
        pipe = self._r.pipeline(transaction=True)
        dropped: list[str] = []
        wanted = self._triage(entries, version, floor, pipe, dropped)
        prefix = self._k.payload_prefix.encode()
        keys = [prefix + fields[b"r"] for _, fields, _, _ in wanted]
        at = len(pipe)  # the MGET's place among the transaction's replies
        if keys:
            pipe.execute_command(b"MGET", *keys)  # raw: the list of records as it came
        ages = Counter(version - oldest for _, _, oldest, _ in wanted if oldest >= 0)
        for age, count in ages.items():
            pipe.hincrby(self._k.hist_taken, age, count)
        self._drop(pipe, dropped)
        replies = pipe.execute() if len(pipe) else []
        records = replies[at] if keys else []
        fresh: list[TakenGroup] = []
        pipe = self._r.pipeline(transaction=True)
        dropped = []
        handed, tokens = state.handed, state.tokens
        for (entry_id, fields, oldest, token), record in zip(wanted, records, strict=True):
            try:
                if record is None:
                    raise EpisodeCodecError("payload: missing (expired or deleted)")
                group = decode_group(record)
            except EpisodeCodecError as exc:
                self._quarantine(pipe, entry_id, fields, record, exc)
                if oldest >= 0:  # counted above as handed out; it is not
                    pipe.hincrby(self._k.hist_taken, version - oldest, -1)
                dropped.append(entry_id)
                continue
            handed.add(entry_id)
            tokens[entry_id] = token
            fresh.append(TakenGroup(entry_id, group))
        self._drop(pipe, dropped)
        if len(pipe):
            pipe.execute()
        return fresh

    def _drop(self, pipe: Any, dropped: list[str]) -> None:
        if dropped:
            pipe.xack(self._k.stream, CONSUMER_GROUP, *dropped)
            pipe.xdel(self._k.stream, *dropped)

    def _triage(
        self, entries: list, version: int, floor: int, pipe: Any, dropped: list[str]
    ) -> list[tuple[str, dict, int, str]]:
        """Queue drops of deleted, malformed and stale entries on `pipe` (their ids go to
        `dropped`); return (entry id, fields, oldest version, payload token) of those to
        decode."""
        wanted = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            if not fields:  # deleted while pending: nothing to deliver
                dropped.append(entry_id)
                continue
            try:
                oldest = int(fields[b"v"])
                token = _text(fields[b"r"])
            except (KeyError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                self._quarantine(pipe, entry_id, fields, None, exc)
                dropped.append(entry_id)
                continue
            if 0 <= oldest < floor:
                self._drop_stale(pipe, fields, version - oldest)
                dropped.append(entry_id)
            else:
                wanted.append((entry_id, fields, oldest, token))
        return wanted

    def _drop_stale(self, pipe: Any, fields: dict, staleness: int) -> None:
        pipe.delete(self._k.payload_prefix.encode() + fields[b"r"])
        pipe.hincrby(self._k.hist_dropped, staleness, 1)
        pipe.hincrby(self._k.stats, "drops_stale", 1)
        if b"e" in fields:
            pipe.rpush(self._k.retry, b"%s|%s" % (fields[b"e"], fields[b"p"]))
            pipe.hincrby(self._k.stats, "stale_requeued", 1)

    def _quarantine(
        self, pipe: Any, entry_id: str, fields: dict, record: bytes | None, exc: Exception
    ) -> None:
        """Move an undecodable entry's record to the capped quarantine stream, and count it."""
        reason = f"{type(exc).__name__}: {exc}"
        logger.error("quarantined undecodable entry %s: %s", entry_id, reason)
        pipe.xadd(
            self._k.quarantine,
            {"entry": entry_id, "error": reason, "g": record or b""},
            maxlen=QUARANTINE_MAXLEN,
            approximate=True,
        )
        if b"r" in fields:
            pipe.delete(self._k.payload_prefix.encode() + fields[b"r"])
        pipe.hincrby(self._k.stats, "corrupt", 1)

    def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete entries (after the step that used them is checkpointed)."""
        if not entry_ids:
            return
        with self._lock:
            known: dict[str, str] = {}
            for state in self._consumers.values():
                known.update(state.tokens)
        tokens = [known.get(entry_id, "") for entry_id in entry_ids]
        self._ack(keys=[self._k.stream, self._k.stats],
                  args=[CONSUMER_GROUP, self._k.payload_prefix, len(entry_ids), *entry_ids,
                        *tokens])  # fmt: skip
        with self._lock:
            for state in self._consumers.values():
                state.handed.difference_update(entry_ids)
                for entry_id in entry_ids:
                    state.tokens.pop(entry_id, None)

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
