"""Calculator tool task: products too long to do in the head (default 4-digit x 3-digit).

The row offers one tool, `calculator` (OpenAI-style JSON schema with an "expression"
argument), and a one-line system prompt; the user turn is ``"4821*397="`` and the label the
exact result. The reference demonstration calls the tool once, reads the observation and
answers with the number, which is what the SFT stage of the agentic toy job learns from.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

from envs.tasks.base import Problem, TaskParams, TaskSpec

SYSTEM_PROMPT = "Use the calculator tool for exact arithmetic."
CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "e.g. 12*(3+4)"},
            },
            "required": ["expression"],
        },
    },
}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class CalculatorParams(TaskParams):
    a_digits: int = Field(4, ge=1, le=12)
    """Exact number of digits of the first operand."""
    b_digits: int = Field(3, ge=1, le=12)
    """Exact number of digits of the second operand."""
    ops: str = "*"
    """The operators to draw from, e.g. "*" or "+-*"."""

    @field_validator("ops")
    @classmethod
    def _check_ops(cls, value: str) -> str:
        bad = sorted(set(value) - set(OPS))
        if not value or bad:
            raise ValueError(f"expected a non-empty string of {''.join(OPS)!r}, bad: {bad}")
        return "".join(sorted(set(value), key=list(OPS).index))


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def sample(rng: random.Random, params: CalculatorParams) -> Problem:
    a, b = _operand(rng, params.a_digits), _operand(rng, params.b_digits)
    op = rng.choice(params.ops)
    expression = f"{a}{op}{b}"
    return Problem(
        key=expression,
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{expression}="},
        ],
        label=str(OPS[op](a, b)),
        metadata={"a": a, "b": b, "op": op, "expression": expression},
        tools=[CALCULATOR_TOOL],
    )


def demonstrate(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Call the calculator on the expression, read its result, answer with it."""
    expression = row["metadata"]["expression"]
    call = {
        "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": expression}},
    }
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calculator", "content": str(row["label"])},
        {"role": "assistant", "content": str(row["label"])},
    ]


CALCULATOR = TaskSpec(
    name="calculator",
    description="products like 4821*397 that need a calculator tool call (params: a_digits, "
    "b_digits, ops)",
    params=CalculatorParams,
    sample=sample,
    demonstrate=demonstrate,
)
