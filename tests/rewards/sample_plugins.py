"""Reward plugins used by the tests: resolved by import path and by entry point."""

from __future__ import annotations

import asyncio
import time

from buffer.episode import Episode
from rewards.protocol import batched, main_key, response_text


def length_reward(episode: Episode) -> float:
    """Sync: the number of characters of the response."""
    return float(len(response_text(episode)))


async def async_contains(episode: Episode, *, needle: str = "yes") -> float:
    """Async with an argument: 1.0 when `needle` is in the response."""
    await asyncio.sleep(0)
    return float(needle in response_text(episode))


@main_key("accuracy")
def with_components(episode: Episode) -> dict[str, float]:
    """A dict result whose scalar is its 'accuracy' key."""
    return {"accuracy": float(response_text(episode) == "42"), "length": 0.5}


def summed_components(episode: Episode) -> dict[str, float]:
    """A dict result without a main key: the scalar is the sum."""
    return {"a": 1.0, "b": 2.5}


@batched
def batch_index(episodes: list[Episode]) -> list[float]:
    """A batch reward: each episode's position in the batch."""
    return [float(i) for i in range(len(episodes))]


class Threshold:
    """A class built with args; its instances are the reward."""

    def __init__(self, *, minimum: int) -> None:
        self.minimum = minimum

    def __call__(self, episode: Episode) -> float:
        return float(len(response_text(episode)) >= self.minimum)


def fails_on_boom(episode: Episode) -> float:
    """Raises for the response 'boom'."""
    if response_text(episode) == "boom":
        raise RuntimeError("exploded on purpose")
    return 1.0


def sleeps_sync(episode: Episode) -> float:
    """Sync plugin that sleeps for the number of seconds in the response."""
    time.sleep(float(response_text(episode)))
    return 1.0


async def sleeps_async(episode: Episode) -> float:
    """Async plugin that sleeps for the number of seconds in the response."""
    await asyncio.sleep(float(response_text(episode)))
    return 1.0


def returns_nan(episode: Episode) -> float:
    return float("nan")


def two_arguments(episode: Episode, other: Episode) -> float:
    """Breaks the protocol: needs two positional arguments."""
    return 0.0


NOT_CALLABLE = 3
