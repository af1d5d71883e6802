"""Countdown: reach a target from 3-4 given numbers with + - * / (each number at most once).

Only solvable instances are generated: the target is the value of a random expression over
the drawn numbers, built by repeatedly combining two of them, keeping every intermediate value
a positive integer (exact division only). That expression is kept in the row's metadata as
one solution; the label is the target. Prompt: ``"Use 3 7 25 50 to make 81."``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from envs.tasks.base import Problem, TaskParams, TaskSpec

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3
_MAX_ATTEMPTS = 10_000


class CountdownParams(TaskParams):
    min_numbers: int = Field(3, ge=2, le=6)
    """Fewest numbers given."""
    max_numbers: int = Field(4, ge=2, le=6)
    """Most numbers given."""
    max_number: int = Field(25, ge=2, le=1000)
    """Each given number is in [1, max_number]."""
    max_target: int = Field(100, ge=2, le=100_000)
    """The target is in [1, max_target] and differs from every given number."""

    @model_validator(mode="after")
    def _check_range(self) -> CountdownParams:
        if self.min_numbers > self.max_numbers:
            raise ValueError(
                f"min_numbers ({self.min_numbers}) must not exceed max_numbers ({self.max_numbers})"
            )
        return self


@dataclass(frozen=True)
class _Node:
    value: int
    text: str
    precedence: int


def _wrap(node: _Node, needed: int) -> str:
    return f"({node.text})" if node.precedence < needed else node.text


def _apply(op: str, left: _Node, right: _Node) -> _Node | None:
    """left op right as a positive-integer node (operands swapped for - and / when needed)."""
    if op in "-/" and left.value < right.value:
        left, right = right, left
    if op == "+":
        value = left.value + right.value
    elif op == "*":
        value = left.value * right.value
    elif op == "-":
        value = left.value - right.value
    else:
        if right.value == 1 or left.value % right.value:
            return None
        value = left.value // right.value
    if value <= 0:
        return None
    precedence = _PRECEDENCE[op]
    right_needed = precedence + 1 if op in "-/" else precedence
    text = f"{_wrap(left, precedence)}{op}{_wrap(right, right_needed)}"
    return _Node(value, text, precedence)


def _random_expression(rng: random.Random, numbers: list[int]) -> _Node | None:
    pool = [_Node(v, str(v), _ATOM) for v in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        node = _apply(rng.choice("+-*/"), pool[i], pool[j])
        if node is None:
            return None
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [node]
    return pool[0]


def sample(rng: random.Random, params: CountdownParams) -> Problem:
    for _ in range(_MAX_ATTEMPTS):
        count = rng.randint(params.min_numbers, params.max_numbers)
        numbers = [rng.randint(1, params.max_number) for _ in range(count)]
        node = _random_expression(rng, numbers)
        if node is None or not 1 <= node.value <= params.max_target or node.value in numbers:
            continue
        shown = " ".join(str(v) for v in numbers)
        return Problem(
            key=f"{','.join(str(v) for v in sorted(numbers))}->{node.value}",
            messages=[{"role": "user", "content": f"Use {shown} to make {node.value}."}],
            label=str(node.value),
            metadata={"numbers": numbers, "target": node.value, "solution": node.text},
        )
    raise ValueError(
        f"task 'countdown': no solvable instance in {_MAX_ATTEMPTS} draws with {params}; "
        "raise max_target or max_number"
    )


def demonstrate(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": str(row["metadata"]["solution"])}]


COUNTDOWN = TaskSpec(
    name="countdown",
    description="reach a target from 3-4 numbers with + - * / (params: min_numbers, "
    "max_numbers, max_number, max_target)",
    params=CountdownParams,
    sample=sample,
    demonstrate=demonstrate,
)
