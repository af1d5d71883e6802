"""The environment protocol for multi-turn episodes.

An environment is created per episode (what gets registered is a factory, see
`envs.registry`), so instances never share mutable state and are safe under concurrency.

* ``reset(task_row) -> messages``: the initial chat messages (system/user turns) for a dataset
  row ``{"id", "messages", "label", "task", ...}``. After reset, ``env.tools`` holds the tool
  schemas (OpenAI-style JSON, rendered into the system prompt by the chat template) or None.
* ``step(assistant_text) -> StepResult``: the model's turn as text (special tokens kept, the
  final stop token removed). Returns what the environment says back (tool results, inserted
  as one ``<|observation|>`` turn), an optional reward, and whether the episode is over.
  ``step`` may be ``async def`` (awaited) or plain (called inline, so keep it fast).

The rollout loop (`rollout.multiturn.run_episode`) enforces max turns and max tokens; an
environment only decides when it is done. A malformed tool call must become an error
observation the model can read, never an exception (`envs.toolbox.ToolBox` does this).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class StepResult:
    """An environment's answer to one model turn.

    observations  tool results (or other feedback), one string each, shown to the model as
                  one observation turn; empty when the episode is done
    reward        the episode's reward when the environment scores it (usually with done)
    done          the episode is over (e.g. the model answered without calling a tool)
    """

    observations: list[str] = field(default_factory=list)
    reward: float | None = None
    done: bool = False


@runtime_checkable
class Env(Protocol):
    """One episode's environment (see module doc)."""

    tools: list[dict[str, Any]] | None

    def reset(self, task_row: Mapping[str, Any]) -> list[dict[str, Any]]: ...

    def step(self, assistant_text: str) -> StepResult | Awaitable[StepResult]: ...


EnvFactory = Callable[[], Env]


def row_messages(task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Copies of a task row's "messages"; ValueError naming the row when they are missing."""
    messages = task_row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"task row {task_row.get('id')!r}: 'messages' must be a non-empty list")
    return [dict(m) for m in messages]


def row_label(task_row: Mapping[str, Any]) -> str | None:
    """A task row's "label" as text (the reference answer a reward compares to), or None."""
    label = task_row.get("label")
    return None if label is None else str(label)
