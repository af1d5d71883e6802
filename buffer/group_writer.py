"""The producing side of the episode stream: push groups, completing their leases atomically.

One push, or a batch of them, is one round trip and one transaction (MULTI/EXEC: all of it
runs or none does, so a producer that dies mid-send leaves nothing behind): ONE MSET of the
encoded records under fresh payload keys, then ONE call of the PUSH script for the whole
batch, which for each group in turn, as one atomic step, checks the lease (refusing a late
push), checks capacity, XADDs an entry that references the payload, and completes the lease.
While the buffer is full the script is retried for the groups still waiting (their payloads,
given a TTL by the script meanwhile, are not re-sent) and the producer's leases are renewed.
The MSET goes out as the codec framed it (buffer/resp.py): each record is copied once, into
its framed argument, and not again by the packer.

put_group calls from several threads of one process (the rollout producer pushes each group
from its own thread as it completes) share round trips: a group commit sends, in one trip,
every group that was put while the previous trip was in flight.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from buffer import scripts
from buffer.codec import encode_group_versioned
from buffer.episode import EpisodeGroup
from buffer.errors import BufferFullError, LeaseMismatchError, PutCancelledError
from buffer.keys import CONSUMER_GROUP, Keys
from buffer.resp import PREPACKED, FastPacker, command_head, pair_frame

logger = logging.getLogger(__name__)

_RETRY = frozenset({"FULL", "NOPAYLOAD"})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Push:
    """One pending push: its script keys/args and its record, framed as an MSET key-value
    pair (kept to re-send if needed).

    Keys and args are bytes: redis-py passes bytes through with one type check, where a str
    or an int costs it several checks and an encode per argument (~3 us per group here)."""

    def __init__(self, keys: Keys, group: EpisodeGroup, lease_id: str | None, token: str):
        self.group, self.lease_id = group, lease_id
        self.payload_key = keys.payload(token).encode()
        # the payload's MSET argument pair, packed around the record in the codec's one copy
        self.pair, oldest = encode_group_versioned(group, self._frame)
        end = len(self.pair) - len(self._after)
        self.record = memoryview(self.pair)[len(self._before) : end]  # no copy
        lease = (lease_id or "").encode()
        self.keys = [keys.done(lease_id or "").encode(), self.payload_key]
        self.args = [lease, str(group.prompt_id).encode(), token.encode(),
                     b"-1" if oldest is None else b"%d" % oldest]  # fmt: skip
        self.status = "NOPAYLOAD"  # the payload has not been written yet
        self.reply: list = []

    def _frame(self, size: int) -> tuple[bytes, bytes]:
        self._before, self._after = pair_frame(self.payload_key, size)
        return self._before, self._after


_PENDING = object()  # a waiter's outcome before its first attempt
_AGAIN = object()  # ... after it, when the buffer was full: the caller waits for room itself


class _Waiter:
    """One put_one call in the group commit: its push and, once decided, its outcome."""

    __slots__ = ("push", "outcome")

    def __init__(self, push: _Push) -> None:
        self.push = push
        self.outcome: object = _PENDING


class GroupWriter:
    """Pushes episode groups of one namespace, waiting while the buffer is at capacity."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        capacity: int,
        put_timeout_s: float,
        renew: Callable[[str], float | None],
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if put_timeout_s <= 0:
            raise ValueError(f"put_timeout_s: must be > 0, got {put_timeout_s}")
        self._r = client
        self._k = keys
        self.capacity = capacity
        self.put_timeout_s = put_timeout_s
        self._payload_ttl_s = int(put_timeout_s) + 3600  # outlives any wait for room
        self._renew = renew  # lease_id -> new deadline | None
        self._push_sha = client.script_load(scripts.PUSH)
        # a client from store.connect packs commands with resp.FastPacker, which sends the
        # payloads' MSET as the codec framed it; any other client is sent the plain MSET
        packer = client.connection_pool.connection_kwargs.get("command_packer")
        self._prepacked = isinstance(packer, FastPacker)
        # payload tokens: a random prefix per writer and a counter (unique across writers
        # and processes like a uuid4 per push, at a fraction of its cost)
        self._token_prefix = os.urandom(8).hex()
        self._token_seq = itertools.count()
        # the group commit of put_one: calls queued while a push is in flight
        self._cond = threading.Condition()
        self._queue: list[_Waiter] = []
        self._flushing = False

    def put_many(
        self,
        items: list[tuple[EpisodeGroup, str | None]],
        lease_seconds: float,
        cancel: threading.Event | None = None,
    ) -> list[str | None]:
        """Push groups (each its own atomic step) in one round trip per attempt.

        Returns the entry id per item (None for a late push), in order. While waiting for
        room, a set `cancel` ends the wait within one retry pause (<= 50 ms): the items not
        yet pushed are given up and PutCancelledError says which were. A lease for another
        prompt raises LeaseMismatchError once the other items are decided.
        """
        outcomes = self._run(
            [self._push(g, lease_id) for g, lease_id in items], lease_seconds, cancel
        )
        results = [None if isinstance(o, Exception) else o for o in outcomes]
        cancelled = [o for o in outcomes if isinstance(o, PutCancelledError)]
        if cancelled:
            raise PutCancelledError(str(cancelled[0]), results)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return results

    def put_one(
        self,
        group: EpisodeGroup,
        lease_id: str | None,
        lease_seconds: float,
        cancel: threading.Event | None = None,
    ) -> str | None:
        """put_many of one group, its first attempt shared with the groups other threads put
        meanwhile (a group commit): a call that finds no push in flight sends its group and
        every queued one in one round trip; calls arriving meanwhile queue for the next.
        A lone caller is sent at once, as before. A group that finds the buffer full then
        waits for room on its own, as in put_many (its own lease renewal, timeout, cancel)."""
        waiter = _Waiter(self._push(group, lease_id))  # encoded in the caller's thread
        with self._cond:
            self._queue.append(waiter)
            while waiter.outcome is _PENDING:
                if self._flushing:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue, []
                self._flushing = True
                self._cond.release()
                try:
                    self._first_attempt(batch)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    self._cond.notify_all()
        outcome = waiter.outcome
        if outcome is _AGAIN:
            outcome = self._run([waiter.push], lease_seconds, cancel, attempted=True)[0]
            if isinstance(outcome, PutCancelledError):
                raise PutCancelledError(str(outcome), [None])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _first_attempt(self, batch: list[_Waiter]) -> None:
        """One round trip for a batch of waiters; each gets its outcome, or _AGAIN to wait
        for room itself (every waiter is decided even if this raises)."""
        try:
            self._attempt([w.push for w in batch])
            for waiter in batch:
                outcome: list[str | None | Exception] = [None]
                retry = self._settle(waiter.push, 0, outcome)
                waiter.outcome = _AGAIN if retry else outcome[0]
        except Exception as exc:  # e.g. Redis unreachable: every group of the batch gets it
            for waiter in batch:
                waiter.outcome = exc
        finally:
            for waiter in batch:
                if waiter.outcome is _PENDING:
                    waiter.outcome = RuntimeError("put_group: the push was interrupted")

    def _push(self, group: EpisodeGroup, lease_id: str | None) -> _Push:
        return _Push(self._k, group, lease_id, f"{self._token_prefix}{next(self._token_seq):x}")

    def _run(
        self,
        pushes: list[_Push],
        lease_seconds: float,
        cancel: threading.Event | None,
        attempted: bool = False,
    ) -> list[str | None | Exception]:
        """The outcome of each push: its entry id, None (a late push), or the error for it
        (LeaseMismatchError; PutCancelledError or BufferFullError for those still waiting
        for room when the wait ended). attempted: the pushes were just tried once and all
        wait for room (put_one's shared first attempt)."""
        outcomes: list[str | None | Exception] = [None] * len(pushes)
        waiting = list(range(len(pushes)))
        start = last_renew = time.monotonic()
        pause = 0.002
        while True:
            if not attempted:
                self._attempt([pushes[i] for i in waiting])
                waiting = [i for i in waiting if self._settle(pushes[i], i, outcomes)]
                if not waiting:
                    return outcomes
            attempted = False
            error: Exception | None = None
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                error = PutCancelledError(
                    f"put_group: cancelled while {len(waiting)} group(s) waited for room", []
                )
            elif now - start >= self.put_timeout_s:
                error = BufferFullError(
                    f"put_group: the buffer stayed full ({self.capacity} unconsumed groups) "
                    f"for put_timeout_s={self.put_timeout_s:g}s; is the trainer taking groups?"
                )
            if error is not None:
                self._r.delete(*[pushes[i].payload_key for i in waiting])
                for i in waiting:
                    outcomes[i] = error
                return outcomes
            if now - last_renew >= lease_seconds / 3:
                for i in waiting:  # waiting on the trainer must not cost a worker its lease
                    if pushes[i].lease_id:
                        self._renew(pushes[i].lease_id)
                last_renew = now
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _attempt(self, pushes: list[_Push]) -> None:
        """One round trip, one transaction: MSET of the payloads not yet written, then one
        call of the push script for all pushes (by sha: redis-py's Script objects add a
        SCRIPT EXISTS round trip to every pipeline). The script persists each payload it
        attaches to an entry, deletes refused ones and puts a TTL on those left waiting for
        room, so no payload outlives its producer unattached."""
        fresh = [push for push in pushes if push.status == "NOPAYLOAD"]
        pipe = self._r.pipeline(transaction=True)
        if fresh and self._prepacked:
            pipe.execute_command(PREPACKED, command_head(b"MSET", 2 * len(fresh)),
                                 *[push.pair for push in fresh])  # fmt: skip
        elif fresh:
            pipe.execute_command(b"MSET", *[x for p in fresh for x in (p.payload_key, p.record)])
        keys = [self._k.leases, self._k.deadlines, self._k.stream, self._k.stats]
        args: list = [self.capacity, CONSUMER_GROUP, self._payload_ttl_s]
        for push in pushes:
            keys += push.keys
            args += push.args
        pipe.execute_command(b"EVALSHA", self._push_sha, len(keys), *keys, *args)
        reply = pipe.execute(raise_on_error=False)[-1]
        if isinstance(reply, Exception):  # the script did not run (to its end)
            self._expire(fresh)
            if not isinstance(reply, redis.exceptions.NoScriptError):
                raise reply
            for push in pushes:  # the server restarted: safe to run again
                push.status = "FULL" if push.status == "NOPAYLOAD" else push.status
            self._push_sha = self._r.script_load(scripts.PUSH)
            return
        for push, one in zip(pushes, reply, strict=True):
            push.reply, push.status = one, _text(one[0])

    def _expire(self, pushes: list[_Push]) -> None:
        """Give just-written payloads the TTL the script would have (it failed)."""
        if pushes:
            pipe = self._r.pipeline(transaction=False)
            for push in pushes:
                pipe.expire(push.payload_key, self._payload_ttl_s)
            pipe.execute()

    @staticmethod
    def _settle(push: _Push, i: int, outcomes: list[str | None | Exception]) -> bool:
        """Record the outcome of one push; True if it must be tried again."""
        if push.status in ("OK", "DONE"):
            outcomes[i] = _text(push.reply[1])
        elif push.status == "LATE":
            logger.warning("late push refused: lease %s of prompt %s expired and was requeued",
                           push.lease_id, push.group.prompt_id)  # fmt: skip
        elif push.status == "MISMATCH":
            outcomes[i] = LeaseMismatchError(
                f"lease_id: {push.lease_id} leases prompt {_text(push.reply[1])!r}, "
                f"not {push.group.prompt_id!r}"
            )
        return push.status in _RETRY
