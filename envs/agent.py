"""Agents written with the OpenAI client: the protocol and its resolution.

An agent is ``async def run(client: openai.AsyncOpenAI, task: dict) -> float | dict``: it
solves one task (a dataset row: ``{"id", "messages", "label", "task", "tools", ...}``) by
calling ``client.chat.completions.create(...)`` as often as it likes, and returns a reward or
rewards by name. The rollout worker hands each episode its own client whose calls it records
token for token (`rollout.agent_rollout`); the agent never sees Physarum.

Agents are named like every other plugin (`rewards.resolver`): an import path
``pkg.module:function``, a built-in name (`BUILTIN_AGENTS`) or an entry point of group
``physarum.agents``. `resolve_agent` runs once at job start and checks that the target is an
async callable taking (client, task), so a typo fails the job before any rollout.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from rewards.resolver import PluginError, entry_point_names, is_async_callable, load_plugin

AGENT_GROUP = "physarum.agents"

BUILTIN_AGENTS: Mapping[str, str] = MappingProxyType(
    {"openai_calculator": "envs.examples.openai_calculator_agent:solve"}
)

AgentResult = float | Mapping[str, float]


class Agent(Protocol):
    """``await agent(client, task)`` -> reward (float) or rewards by name (dict)."""

    def __call__(self, client: Any, task: dict[str, Any]) -> Awaitable[AgentResult]: ...


def valid_agent_names() -> list[str]:
    """Built-in names plus the installed entry points of group physarum.agents."""
    return sorted({*BUILTIN_AGENTS, *entry_point_names(AGENT_GROUP)})


def resolve_agent(name: str) -> Agent:
    """The agent function named `name`, checked against the protocol; PluginError if not."""
    target = load_plugin(name, builtins=BUILTIN_AGENTS, group=AGENT_GROUP, kind="agent")
    if not callable(target) or not is_async_callable(target):
        raise PluginError(
            f"agent {name!r}: resolved to {type(target).__name__} {target!r}; expected "
            "`async def run(client: openai.AsyncOpenAI, task: dict) -> float | dict`"
        )
    try:
        inspect.signature(target).bind(object(), {})
    except TypeError as exc:
        raise PluginError(
            f"agent {name!r}: must accept (client, task) as two positional arguments: {exc}"
        ) from exc
    except ValueError:
        pass  # no signature to inspect (a C callable): trust is_async_callable
    return target
