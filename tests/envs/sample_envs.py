"""Environments used by the env-registry tests (resolved by import path and entry point)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envs.base import StepResult


class EchoEnv:
    """Echoes every turn back `rounds` times, then ends with reward 1."""

    def __init__(self, *, rounds: int = 1) -> None:
        self.rounds = rounds
        self.seen = 0
        self.tools: list[dict[str, Any]] | None = None

    def reset(self, task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
        return list(task_row["messages"])

    def step(self, assistant_text: str) -> StepResult:
        self.seen += 1
        if self.seen > self.rounds:
            return StepResult(reward=1.0, done=True)
        return StepResult(observations=[assistant_text])


def make_echo(rounds: int = 2) -> EchoEnv:
    """A plain factory function."""
    return EchoEnv(rounds=rounds)


class NoStep:
    tools = None

    def reset(self, task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
        return []
