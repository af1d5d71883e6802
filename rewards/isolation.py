"""Run a sync plugin call in its own thread, with a timeout that frees the caller for good.

A Python thread cannot be killed, so a sync plugin that hangs keeps its thread. What matters
is that it cannot starve anything else: each plugin has its own `SyncLane` of daemon threads
(never a slot in a pool shared with other plugins), bounding how many of its calls may be
running at once, abandoned (timed-out) ones included. A hung plugin therefore fills only its
own lane: its later calls time out, the other plugins keep scoring, and daemon threads never
hold the process open at exit. A lane's thread that returned waits `IDLE_S` for its next call
before it exits: starting a thread per call cost a rollout worker ~6 % of its event loop (the
loop blocks in Thread.start until the new thread gets the GIL from the engine's).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

IDLE_S = 2.0  # how long a lane's idle thread waits for another call before it exits


class SyncLane:
    """At most `limit` concurrent calls of one sync plugin, each in its own daemon thread."""

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{name}: lane limit must be >= 1, got {limit}")
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self._running = 0  # calls started and not yet returned (abandoned ones included)
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._idle = 0  # threads waiting on _jobs for their next call
        self._jobs: queue.SimpleQueue[Callable[[], Callable[[], None]]] = queue.SimpleQueue()

    @property
    def running(self) -> int:
        """Threads of this plugin still running (hung or abandoned calls count)."""
        with self._lock:
            return self._running

    async def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """`fn(arg)` in a daemon thread of this lane, once a slot is free. Cancelling the
        awaiting task (e.g. asyncio.wait_for's timeout) abandons the call; its slot (and its
        thread) free when it returns."""
        await self._acquire()
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()

        def run() -> Callable[[], None]:
            """The call; returns how to hand its outcome to the caller (after the thread is
            idle again, so a caller that calls once more finds it)."""
            try:
                value, exc = fn(arg), None
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
                value, exc = None, error
            finally:
                self._release()
            return lambda: _deliver(loop, result, value, exc)

        self._dispatch(run)
        return await result

    def _dispatch(self, job: Callable[[], Callable[[], None]]) -> None:
        """Hand `job` to an idle thread of the lane, or start one."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._serve, args=(job,), name=f"reward-{self.name}",
                         daemon=True).start()  # fmt: skip

    def _serve(self, job: Callable[[], Callable[[], None]]) -> None:
        """Run jobs until none came for IDLE_S. The idle count and the queue change under the
        lock, so a job handed over as the wait times out is still run, never stranded."""
        while True:
            deliver = job()
            with self._lock:
                self._idle += 1
            deliver()
            while True:
                try:
                    job = self._jobs.get(timeout=IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():
                            self._idle -= 1
                            return

    async def _acquire(self) -> None:
        with self._lock:
            if self._running < self.limit and not self._waiters:
                self._running += 1
                return
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter  # _release hands its slot over (running stays counted)
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
                    raise
            # the slot was handed over just as we were cancelled: pass it on
            self._release()
            raise

    def _release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                if _wake(loop, waiter):
                    return  # the slot passes to that waiter
            self._running -= 1


def _wake(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> bool:
    """Resolve `waiter` on its loop; False when that loop is gone (the slot goes elsewhere)."""

    def resolve() -> None:
        if not waiter.done():
            waiter.set_result(None)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # loop closed
        return False
    return True


def _deliver(
    loop: asyncio.AbstractEventLoop,
    result: asyncio.Future[Any],
    value: Any,
    exc: BaseException | None,
) -> None:
    def settle() -> None:
        if result.done():  # the caller gave up (timeout): the late answer is dropped
            return
        if exc is not None:
            result.set_exception(exc)
        else:
            result.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop closed while the plugin ran: nobody is waiting
        pass
