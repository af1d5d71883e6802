"""Reward resolution: a `RewardSpec` (name, weight, args) -> a checked, ready `ResolvedReward`.

Names resolve through `rewards.resolver` (import path, built-in name, entry point of group
``physarum.rewards``). Arguments bind once:

* a class is instantiated with ``args`` (``pkg.module:Class``); the instance is the reward;
* a function gets ``args`` as keyword arguments (``functools.partial``).

The result is checked against the protocol (`rewards.protocol`): callable with exactly one
positional argument (an Episode, or a list of them for a batch reward). Whether it is async,
batched or has a main key is read here, once, so nothing is inspected per sample.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from rewards.protocol import BATCHED_ATTR, MAIN_KEY_ATTR
from rewards.resolver import (
    PluginError,
    accepts_one_positional,
    build_with_args,
    entry_point_names,
    is_async_callable,
    load_plugin,
)

REWARD_GROUP = "physarum.rewards"

BUILTIN_REWARDS: Mapping[str, str] = MappingProxyType(
    {
        "exact": "rewards.builtins.match:exact_match",
        "numeric": "rewards.builtins.match:numeric_match",
        "math": "rewards.builtins.math_answer:math_match",
        "format": "rewards.builtins.format:FormatReward",
        "code": "rewards.builtins.code:CodeTestsReward",
        "remote_rm": "rewards.builtins.remote_rm:RemoteRewardModel",
        "arithmetic": "rewards.builtins.toy_tasks:arithmetic_reward",
        "countdown": "rewards.builtins.toy_tasks:countdown_reward",
        "calculator_task": "rewards.builtins.toy_tasks:calculator_task_reward",
        "env": "rewards.builtins.env:env_reward",
        "reasoning_gym": "rewards.builtins.reasoning_gym:reasoning_gym_reward",
        "agent": "rewards.builtins.agent:agent_reward",
    }
)


class RewardSpecLike(Protocol):
    """Anything with these attributes (RewardSpec, or the config's RewardPluginConfig)."""

    name: str
    weight: float
    args: dict[str, Any]


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a job: `name` (see module doc), its `weight` in the sum, its `args`."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedReward:
    """A reward ready to call. `fn` takes an Episode (or list[Episode] when `batched`)."""

    name: str
    fn: Callable[[Any], Any]
    weight: float
    batched: bool
    is_async: bool
    main_key: str | None


def valid_reward_names() -> list[str]:
    """Built-in names plus the installed entry points of group physarum.rewards."""
    return sorted({*BUILTIN_REWARDS, *entry_point_names(REWARD_GROUP)})


def resolve_reward(spec: RewardSpecLike) -> ResolvedReward:
    """Load, bind and check one reward; PluginError naming the spec on any problem."""
    weight = float(spec.weight)
    if not math.isfinite(weight):
        raise PluginError(f"reward {spec.name!r}: weight must be finite, got {spec.weight}")
    args = dict(spec.args or {})
    target = load_plugin(spec.name, builtins=BUILTIN_REWARDS, group=REWARD_GROUP, kind="reward")
    if inspect.isclass(target):
        fn = build_with_args(target, args, kind="reward", name=spec.name)
        marks: Any = fn
    elif callable(target):
        fn = _bind_function(target, args, spec.name)
        marks = target
    else:
        raise PluginError(
            f"reward {spec.name!r}: resolved to a {type(target).__name__}, expected a function "
            "or a class whose instances are callable"
        )
    if not callable(fn):
        raise PluginError(f"reward {spec.name!r}: {type(fn).__name__} instances are not callable")
    if not accepts_one_positional(fn):
        raise PluginError(
            f"reward {spec.name!r}: must accept exactly one positional argument (an Episode, or "
            f"list[Episode] for a @batched reward); signature is {_signature(fn)}"
        )
    main = getattr(marks, MAIN_KEY_ATTR, None)
    if main is not None and not isinstance(main, str):
        raise PluginError(f"reward {spec.name!r}: {MAIN_KEY_ATTR} must be a str, got {main!r}")
    return ResolvedReward(
        name=spec.name,
        fn=fn,
        weight=weight,
        batched=bool(getattr(marks, BATCHED_ATTR, False)),
        is_async=is_async_callable(fn),
        main_key=main,
    )


def _bind_function(target: Callable[..., Any], args: dict[str, Any], name: str) -> Any:
    if not args:
        return target
    try:
        inspect.signature(target).bind_partial(object(), **args)
    except TypeError as exc:
        raise PluginError(
            f"reward {name!r}: does not accept args {sorted(args)}: {exc}; "
            f"signature is {_signature(target)}"
        ) from exc
    bound = functools.partial(target, **args)
    return bound


def _signature(fn: Any) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(unknown)"
