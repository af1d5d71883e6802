"""Reward plugins for the group-call tests: they record which thread scored which episode."""

from __future__ import annotations

import asyncio
import threading

from buffer.episode import Episode

CALLS: list[tuple[str, int]] = []  # (response text, thread id), in call order
RELEASE = threading.Event()  # set by the test so a hung call's thread finishes


def recorded(episode: Episode) -> float | dict[str, float]:
    """Length of the text; "boom" raises, "nan" is invalid, "dict" returns components,
    "hang" blocks until RELEASE."""
    text = episode.metadata["response_text"]
    CALLS.append((text, threading.get_ident()))
    if text == "boom":
        raise RuntimeError("exploded on purpose")
    if text == "hang":
        RELEASE.wait()
    if text == "nan":
        return float("nan")
    if text == "dict":
        return {"a": 1.5, "b": 2.0}
    return float(len(text))


def returns_coroutine(episode: Episode):  # a plain def that hands back an awaitable
    async def value() -> float:
        await asyncio.sleep(0)
        return float(len(episode.metadata["response_text"]))

    return value()
