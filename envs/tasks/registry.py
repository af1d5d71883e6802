"""Tasks by name, and the functions that generate rows and corpora from them.

A task name resolves like a reward or an env (`rewards.resolver`, one plugin mechanism): a
built-in toy task (`TASKS`), an entry point of group ``physarum.tasks``, an import path
``pkg.module:SPEC`` naming a `TaskSpec`, or a family ``reasoning_gym:<dataset>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from envs.tasks.arithmetic import ARITHMETIC
from envs.tasks.base import TaskSpec
from envs.tasks.calculator import CALCULATOR
from envs.tasks.countdown import COUNTDOWN
from rewards.resolver import load_plugin

TASK_GROUP = "physarum.tasks"

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (ARITHMETIC, COUNTDOWN, CALCULATOR)}

BUILTIN_TASKS: Mapping[str, str] = MappingProxyType(
    {
        "arithmetic": "envs.tasks.arithmetic:ARITHMETIC",
        "countdown": "envs.tasks.countdown:COUNTDOWN",
        "calculator": "envs.tasks.calculator:CALCULATOR",
    }
)
TASK_FAMILIES: Mapping[str, str] = MappingProxyType(
    {"reasoning_gym": "envs.tasks.reasoning_gym:reasoning_gym_task"}
)


def get_task(task: str) -> TaskSpec:
    """The TaskSpec named `task`; ValueError (a PluginError) listing the valid names otherwise."""
    if not isinstance(task, str):
        raise ValueError(f"unknown task {task!r}; expected a name, got {type(task).__name__}")
    spec = load_plugin(
        task, builtins=BUILTIN_TASKS, group=TASK_GROUP, kind="task", families=TASK_FAMILIES
    )
    if not isinstance(spec, TaskSpec):
        raise ValueError(
            f"task {task!r}: resolved to a {type(spec).__name__}, not an envs.tasks.TaskSpec"
        )
    return spec


def make_rows(
    task: str, n: int, seed: int = 0, split: str = "train", **params: Any
) -> list[dict[str, Any]]:
    """`n` dataset rows of `task` from the `split` ("train" or "test").

    Rows are ``{"id", "messages", "label", "task", "metadata"}`` (+ ``"tools"`` for the
    calculator task). `params` are the task's own parameters (e.g. ``digits=3, ops="+-"`` for
    arithmetic) plus ``unique=True`` to forbid repeated problems. Deterministic: the same
    arguments give the same rows. ValueError for an unknown task, split or param.
    """
    return get_task(task).make_rows(n, seed=seed, split=split, **params)


def tokenizer_corpus(n_per_task: int = 2000, seed: int = 0) -> list[str]:
    """Text of every built-in task (prompts, answers, tool calls, observations, tool schemas).

    This is the corpus `models.tokenizer.build_toy_tokenizer` is trained on.
    """
    lines: list[str] = []
    for spec in TASKS.values():
        lines.extend(spec.corpus_lines(n=n_per_task, seed=seed))
    return lines
