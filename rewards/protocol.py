"""The reward plugin protocol: what a reward is, what it reads, what it may return.

A reward plugin is a callable that scores finished episodes. Two shapes exist:

* per-episode: ``(episode: Episode) -> float | dict[str, float]``
* batch:       ``(episodes: list[Episode]) -> list[float | dict[str, float]]`` (same order)

Either may be ``async def`` (awaited on the event loop) or plain ``def`` (run in a worker
thread by `rewards.composite.RewardFn`, so it never blocks the loop). Batch-ness is declared,
never guessed: decorate a function with `@batched`, or give a class a class attribute
``reward_batched = True``.

What a plugin reads (the contract the rollout functions fulfil before scoring):

* ``episode.metadata["response_text"]``: the decoded response (all response tokens, special
  tokens kept, the final stop token removed). Always set by the rollout.
* ``episode.metadata["final_text"]``: multi-turn only, the text of the last model turn.
* ``episode.metadata["label"]``, ``["task"]``: from the dataset row, when the row has them.
* ``episode.metadata["prompt_text"]``: the decoded prompt, when the rollout had a tokenizer.
* any other key the dataset row carried under ``"metadata"`` (e.g. countdown's ``numbers``).

What a plugin returns: a finite float, or a dict of finite floats (its components). A dict's
scalar is the sum of its values unless the plugin names a main key (`@main_key("acc")` on a
function, or a class attribute ``reward_main_key = "acc"``): then the scalar is that value and
the other keys are diagnostics. `rewards.composite.RewardFn` records the scalar under the
plugin's name in ``episode.rewards`` and each component under ``"<name>/<key>"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from buffer.episode import Episode

RewardValue = float | dict[str, float]
BATCHED_ATTR = "reward_batched"
MAIN_KEY_ATTR = "reward_main_key"

F = TypeVar("F", bound=Callable[..., Any])


class RewardInputError(ValueError):
    """An episode lacks what a reward needs (e.g. metadata["label"]); the message names it."""


@runtime_checkable
class RewardPlugin(Protocol):
    """A per-episode reward: sync or async, returns a float or a dict of floats."""

    def __call__(self, episode: Episode) -> RewardValue | Awaitable[RewardValue]: ...


@runtime_checkable
class BatchRewardPlugin(Protocol):
    """A batch reward (declared with `@batched`): one value per episode, in order."""

    def __call__(
        self, episodes: list[Episode]
    ) -> list[RewardValue] | Awaitable[list[RewardValue]]: ...


def batched(fn: F) -> F:
    """Declare `fn` a batch reward: it takes `list[Episode]` and returns one value each."""
    setattr(fn, BATCHED_ATTR, True)
    return fn


def main_key(key: str) -> Callable[[F], F]:
    """Declare which key of a dict result is the plugin's scalar (default: the sum)."""

    def mark(fn: F) -> F:
        setattr(fn, MAIN_KEY_ATTR, key)
        return fn

    return mark


def metadata_str(episode: Episode, key: str) -> str:
    """`episode.metadata[key]` as a str; RewardInputError naming the key when it is absent."""
    if key not in episode.metadata or episode.metadata[key] is None:
        raise RewardInputError(
            f"metadata[{key!r}] is missing; the rollout (or the dataset row) must provide it"
        )
    return str(episode.metadata[key])


def response_text(episode: Episode) -> str:
    """The decoded response the rollout stored in metadata["response_text"]."""
    return metadata_str(episode, "response_text")


def final_text(episode: Episode) -> str:
    """The last model turn (multi-turn) or else the whole response."""
    if episode.metadata.get("final_text") is not None:
        return str(episode.metadata["final_text"])
    return response_text(episode)


def label(episode: Episode) -> str:
    """The reference answer stored in metadata["label"]."""
    return metadata_str(episode, "label")


def to_scalar(value: Any, main: str | None, plugin: str) -> tuple[float, Mapping[str, float]]:
    """Validate a plugin result; return (scalar, components). Raises ValueError naming `plugin`.

    A bool counts as 0/1. A dict must be non-empty with finite float values; its scalar is
    `value[main]` when `main` is set, else the sum of its values.
    """
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"reward {plugin!r} returned an empty dict")
        components = {str(k): _finite(v, f"{plugin}[{k!r}]") for k, v in value.items()}
        if main is None:
            return math.fsum(components.values()), components
        if main not in components:
            raise ValueError(
                f"reward {plugin!r} declares main key {main!r} but returned keys "
                f"{sorted(components)}"
            )
        return components[main], components
    return _finite(value, plugin), {}


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real):
        raise ValueError(f"reward {where} returned {type(value).__name__}, expected a float")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"reward {where} returned {result}, expected a finite float")
    return result
