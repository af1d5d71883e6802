"""Run a sync plugin call in its own thread, with a timeout that frees the caller for good.

A Python thread cannot be killed, so a sync plugin that hangs keeps its thread. What matters
is that it cannot starve anything else: every call gets a fresh daemon thread (never a slot
in a pool shared with other plugins), and each plugin has its own `SyncLane` bounding how
many of its calls may be running at once, abandoned (timed-out) ones included. A hung plugin
therefore fills only its own lane: its later calls time out, the other plugins keep scoring,
and daemon threads never hold the process open at exit.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class SyncLane:
    """At most `limit` concurrent calls of one sync plugin, each in its own daemon thread."""

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{name}: lane limit must be >= 1, got {limit}")
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self._running = 0  # threads started and not yet returned (abandoned ones included)
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    @property
    def running(self) -> int:
        """Threads of this plugin still running (hung or abandoned calls count)."""
        with self._lock:
            return self._running

    async def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """`fn(arg)` in a new daemon thread, once a slot is free. Cancelling the awaiting task
        (e.g. asyncio.wait_for's timeout) abandons the thread; its slot frees when it returns."""
        await self._acquire()
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                value = fn(arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                _deliver(loop, result, None, exc)
            else:
                _deliver(loop, result, value, None)
            finally:
                self._release()

        threading.Thread(target=run, name=f"reward-{self.name}", daemon=True).start()
        return await result

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
