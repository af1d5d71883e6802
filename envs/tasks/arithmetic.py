"""Arithmetic: ``a op b`` with a short prompt such as ``"37+58="`` and the label ``"95"``.

Operands are uniform in [0, 10**digits); ops are drawn uniformly from `ops` ("+", "-", "*").
The prompt is deliberately tiny (the toy model has ~1.7M parameters), as in TRL's baseline.
"""

from __future__ import annotations

import operator
import random
from typing import Any

from pydantic import Field, field_validator

from envs.tasks.base import Problem, TaskParams, TaskSpec, label_as_answer

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class ArithmeticParams(TaskParams):
    digits: int = Field(2, ge=1, le=9)
    """Maximum number of digits of each operand."""
    ops: str = "+"
    """The operators to draw from, e.g. "+" or "+-*"."""

    @field_validator("ops", mode="before")
    @classmethod
    def _join_ops(cls, value: Any) -> Any:
        return "".join(value) if isinstance(value, list | tuple) else value

    @field_validator("ops")
    @classmethod
    def _check_ops(cls, value: str) -> str:
        bad = sorted(set(value) - set(OPS))
        if not value or bad:
            raise ValueError(f"expected a non-empty string of {''.join(OPS)!r}, bad: {bad}")
        return "".join(sorted(set(value), key=list(OPS).index))


def sample(rng: random.Random, params: ArithmeticParams) -> Problem:
    high = 10**params.digits
    a, b = rng.randrange(high), rng.randrange(high)
    op = rng.choice(params.ops)
    expression = f"{a}{op}{b}"
    label = str(OPS[op](a, b))
    return Problem(
        key=expression,
        messages=[{"role": "user", "content": f"{expression}="}],
        label=label,
        metadata={"a": a, "b": b, "op": op},
    )


ARITHMETIC = TaskSpec(
    name="arithmetic",
    description="a op b with short prompts like '37+58=' (params: digits, ops)",
    params=ArithmeticParams,
    sample=sample,
    demonstrate=label_as_answer,
)
