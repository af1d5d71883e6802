"""The built-in toy tasks by name, and the functions that generate rows and corpora from them."""

from __future__ import annotations

from typing import Any

from envs.tasks.arithmetic import ARITHMETIC
from envs.tasks.base import TaskSpec
from envs.tasks.calculator import CALCULATOR
from envs.tasks.countdown import COUNTDOWN

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (ARITHMETIC, COUNTDOWN, CALCULATOR)}


def get_task(task: str) -> TaskSpec:
    """The TaskSpec named `task`; ValueError listing the valid names otherwise."""
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted(TASKS)}") from None


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
