"""Run a sync plugin call in its own thread, with a timeout that frees the caller for good.

A Python thread cannot be killed, so a sync plugin that hangs keeps its thread. What matters
is that it cannot starve anything else: each plugin has its own `SyncLane` of daemon threads
(never a slot in a pool shared with other plugins), bounding how many of its calls may be
running at once, abandoned (timed-out) ones included. A hung plugin therefore fills only its
own lane: its later calls time out, the other plugins keep scoring, and daemon threads never
hold the process open at exit. A lane's thread that returned waits `IDLE_S` for its next call
before it exits: starting a thread per call cost a rollout worker ~6 % of its event loop (the
loop blocks in Thread.start until the new thread gets the GIL from the engine's).

Calls beyond the limit wait in the lane's backlog, in order; a thread that returns takes the
next one itself, so a group's calls cost the event loop one hand-over each, not a round trip
through the loop per freed slot. A call whose caller gave up before it started never starts.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

IDLE_S = 2.0  # how long a lane's idle thread waits for another call before it exits


@dataclass
class _Call:
    """One plugin call and where its outcome goes (a future of the caller's loop)."""

    fn: Callable[[Any], Any]
    arg: Any
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future[Any]
    mailbox: _Mailbox  # where its outcome goes (the loop's, batched)

    def run(self) -> tuple[Any, BaseException | None]:
        try:
            return self.fn(self.arg), None
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            return None, error

    def given_up(self) -> bool:
        """The caller is gone (its loop closed) or stopped waiting (future done: cancelled);
        read from a lane thread, where a stale answer only runs a call that is then dropped."""
        return self.loop.is_closed() or self.result.done()

    def settle(self, value: Any, exc: BaseException | None) -> None:
        """Resolve the caller's future (on its loop)."""
        if self.result.done():  # the caller gave up (timeout): the late answer is dropped
            return
        if exc is not None:
            self.result.set_exception(exc)
        else:
            self.result.set_result(value)


class _Mailbox:
    """Outcomes handed from a lane's threads to one event loop, settled in batches: the
    first outcome posted while none waits wakes the loop (a cross-thread write), later
    ones ride along, so a group of n calls costs the loop a few wake-ups instead of n."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._posted: list[tuple[_Call, Any, BaseException | None]] = []

    def post(self, call: _Call, value: Any, exc: BaseException | None) -> None:
        with self._lock:
            self._posted.append((call, value, exc))
            if len(self._posted) > 1:  # a flush is already scheduled and will take it
                return
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop closed while the plugin ran: nobody is waiting
            with self._lock:
                self._posted.clear()

    def _flush(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
        for call, value, exc in posted:
            call.settle(value, exc)


class SyncLane:
    """At most `limit` concurrent calls of one sync plugin, each in its own daemon thread."""

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{name}: lane limit must be >= 1, got {limit}")
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self._running = 0  # calls started and not yet returned (abandoned ones included)
        self._backlog: deque[_Call] = deque()  # calls waiting for a slot, in order
        self._idle = 0  # threads waiting on _jobs for their next call
        self._jobs: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._mailbox: _Mailbox | None = None  # of the loop that last submitted

    @property
    def running(self) -> int:
        """Threads of this plugin still running (hung or abandoned calls count)."""
        with self._lock:
            return self._running

    async def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """`fn(arg)` in a daemon thread of this lane, once a slot is free. Cancelling the
        awaiting task (e.g. asyncio.wait_for's timeout) abandons the call; its slot (and its
        thread) free when it returns."""
        (result,) = self.submit(fn, [arg])
        try:
            return await result
        except asyncio.CancelledError:
            self.withdraw([result])
            raise

    def submit(self, fn: Callable[[Any], Any], args: Sequence[Any]) -> list[asyncio.Future[Any]]:
        """`fn(arg)` for each of `args` in this lane's threads, in order, at most `limit` at
        once; a future of the running loop per call. Give up on calls with `withdraw`."""
        loop = asyncio.get_running_loop()
        mailbox = self._mailbox
        if mailbox is None or mailbox.loop is not loop:
            mailbox = self._mailbox = _Mailbox(loop)
        calls = [_Call(fn, arg, loop, loop.create_future(), mailbox) for arg in args]
        fresh: list[_Call] = []
        with self._lock:
            for call in calls:
                if self._running < self.limit and not self._backlog:
                    self._running += 1
                    if self._idle:  # under the lock: an idle thread timing out sees the job
                        self._idle -= 1
                        self._jobs.put(call)
                    else:
                        fresh.append(call)
                else:
                    self._backlog.append(call)
        for call in fresh:
            threading.Thread(target=self._serve, args=(call,), name=f"reward-{self.name}",
                             daemon=True).start()  # fmt: skip
        return [call.result for call in calls]

    def withdraw(self, results: Iterable[asyncio.Future[Any]]) -> None:
        """The calls of `results` that have not started never will (the caller gave up);
        started ones run on, abandoned, holding their slot until they return."""
        gone = {id(result) for result in results}
        with self._lock:
            if self._backlog:
                self._backlog = deque(c for c in self._backlog if id(c.result) not in gone)

    def _serve(self, call: _Call) -> None:
        """Run calls, then backlog calls, until none came for IDLE_S. The thread counts as
        idle (and its slot as free) before its outcome is delivered, so a caller that calls
        again at once finds it; the idle count and the queue change under the lock, so a job
        handed over as the wait times out is still run, never stranded."""
        while True:
            value, exc = call.run()
            with self._lock:
                following = self._next_in_backlog()  # the slot passes on
                if following is None:
                    self._running -= 1
                    self._idle += 1
            call.mailbox.post(call, value, exc)
            if following is not None:
                call = following
                continue
            while True:
                try:
                    call = self._jobs.get(timeout=IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():
                            self._idle -= 1
                            return

    def _next_in_backlog(self) -> _Call | None:
        """The oldest backlog call whose caller still waits (under the lock)."""
        while self._backlog:
            call = self._backlog.popleft()
            if not call.given_up():
                return call
        return None
