"""A group's calls of one plain sync per-episode reward in a single lane hop.

Calling such a plugin episode by episode costs each episode a task, a `wait_for`, a lane
slot and a thread hop back to the event loop (`call_soon_threadsafe`): most of the reward's
CPU on a rollout worker, where the plugin itself is microseconds. Here one call of the
plugin's own `SyncLane` (same thread, same isolation from the loop and from other plugins)
runs the group's episodes in turn, under one deadline: `timeout_s` from the start, the same
deadline each per-episode call had (its timeout counted from the group's start too).

A call still running at the deadline is that episode's timeout; the episodes its thread had
not started are handed back (`None`) for the caller to score one by one, so a hung call
fails its own episode only, as before. The abandoned thread starts no further episode.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rewards.isolation import SyncLane

# one episode's result: ("ok", value) / ("raised", exception) / ("timeout", None); None for
# an episode the lane's thread never started (the caller scores it on its own)
Result = tuple[str, Any] | None


async def call_group(
    lane: SyncLane, fn: Callable[[Any], Any], items: Sequence[Any], timeout_s: float
) -> list[Result]:
    """`fn(item)` for each item, in order, in one call of `lane`, within `timeout_s`."""
    results: list[Result] = [None] * len(items)
    lock = threading.Lock()
    state = {"stopped": False, "current": -1}  # under lock: the abandoned flag, the claim

    def run_all(_: object) -> None:
        for index, item in enumerate(items):
            with lock:
                if state["stopped"]:
                    return
                state["current"] = index
            try:
                outcome: Result = ("ok", fn(item))
            except Exception as exc:  # noqa: BLE001 - handed to the caller per episode
                outcome = ("raised", exc)
            with lock:
                if not state["stopped"]:
                    results[index] = outcome

    try:
        await asyncio.wait_for(lane.call(run_all, None), timeout_s)
    except TimeoutError:
        with lock:
            state["stopped"] = True
            current = state["current"]
            if current < 0:  # never started (the lane was full): every call timed out
                return [("timeout", None)] * len(items)
            if results[current] is None:
                results[current] = ("timeout", None)
            return list(results)
    except BaseException:  # cancelled: the thread starts no further episode
        with lock:
            state["stopped"] = True
        raise
    return results
