"""What a toy task is: a seeded problem sampler with typed parameters and a held-out split.

A task draws `Problem`s from a `random.Random`; `TaskSpec.make_rows` turns them into dataset
rows ``{"id", "messages", "label", "task", "metadata"}`` (+ ``"tools"`` for tool tasks).

The split is a property of the *problem*, not of the seed: a problem belongs to the test
split when a hash of its canonical key falls in the lowest `TEST_FRACTION` of the hash range,
so train and test rows can never share a problem, whatever the seeds. Generation is
reproducible byte for byte: the same (task, n, seed, split, params) always gives the same rows,
and a run with a larger `n` extends a smaller one (rows are drawn in sequence).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from envs.tool_calls import ToolCall, render_tool_call

SPLITS = ("train", "test")
TEST_FRACTION = 0.05  # share of every task's problem space held out for evaluation
_HASH_BUCKETS = 1_000_000
_MAX_DRAWS_PER_ROW = 200  # rejection-sampling budget per requested row


class TaskParams(BaseModel):
    """Base of every task's parameters: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Problem:
    """One drawn problem.

    key       canonical text of the problem (decides the split and uniqueness)
    messages  the prompt conversation (user turn, optional system turn)
    label     the reference answer, as text
    metadata  JSON-serialisable facts a reward or a demonstration needs
    tools     tool JSON schemas offered to the model (OpenAI style), or None
    """

    key: str
    messages: list[dict[str, Any]]
    label: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None


Sampler = Callable[[random.Random, Any], Problem]
Demonstrator = Callable[[Mapping[str, Any]], list[dict[str, Any]]]


def label_as_answer(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Demonstrator of a task whose reference answer is its label: one assistant turn."""
    return [{"role": "assistant", "content": str(row["label"])}]


def split_of(task: str, key: str) -> str:
    """'test' for the held-out share of the problem space, else 'train' (seed-independent)."""
    digest = hashlib.sha256(f"{task}:{key}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % _HASH_BUCKETS
    return "test" if bucket < TEST_FRACTION * _HASH_BUCKETS else "train"


def _format_validation_error(task: str, err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        name = ".".join(str(p) for p in item["loc"]) or "params"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown param {name!r}")
        else:
            parts.append(f"param {name!r}: {item['msg']} (got {item.get('input')!r})")
    return f"task {task!r}: " + "; ".join(parts)


@dataclass(frozen=True)
class TaskSpec:
    """A registered toy task.

    name         registry name, also the rows' "task" field
    description  one line for `physarum data make --help` and errors
    params       the pydantic model of its parameters (defaults = the documented defaults)
    sample       draws one Problem from an RNG and validated params
    demonstrate  the reference assistant turns for a row (SFT demonstrations)
    """

    name: str
    description: str
    params: type[TaskParams]
    sample: Sampler
    demonstrate: Demonstrator
    id_width: ClassVar[int] = 6

    def parse_params(self, params: Mapping[str, Any]) -> TaskParams:
        """Validated parameters; ValueError naming the bad or unknown param."""
        try:
            return self.params(**params)
        except ValidationError as err:
            raise ValueError(_format_validation_error(self.name, err)) from None

    def make_rows(
        self, n: int, seed: int = 0, split: str = "train", **params: Any
    ) -> list[dict[str, Any]]:
        """`n` rows of the `split`; see `envs.tasks.make_rows`."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative integer, got {n!r}")
        unique = params.pop("unique", False)
        if not isinstance(unique, bool):
            raise ValueError(f"task {self.name!r}: param 'unique' must be true or false")
        parsed = self.parse_params(params)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        budget = _MAX_DRAWS_PER_ROW * n + 10_000
        while len(rows) < n:
            if budget == 0:
                hint = "; lower n, widen the params or set unique=false" if unique else ""
                raise ValueError(
                    f"task {self.name!r}: found only {len(rows)} "
                    f"{'distinct ' if unique else ''}{split} problems for n={n}{hint}"
                )
            budget -= 1
            problem = self.sample(rng, parsed)
            if split_of(self.name, problem.key) != split or (unique and problem.key in seen):
                continue
            seen.add(problem.key)
            rows.append(self._row(problem, len(rows), seed, split))
        return rows

    def _row(self, problem: Problem, index: int, seed: int, split: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": f"{self.name}-{split}-{seed}-{index:0{self.id_width}d}",
            "messages": [dict(m) for m in problem.messages],
            "label": problem.label,
            "task": self.name,
        }
        if problem.tools is not None:
            row["tools"] = problem.tools
        row["metadata"] = {"split": split, **problem.metadata}
        return row

    def demonstration(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The row's prompt messages followed by the reference assistant turns (for SFT)."""
        return [dict(m) for m in row["messages"]] + self.demonstrate(row)

    def corpus_lines(self, n: int = 1000, seed: int = 0, **params: Any) -> list[str]:
        """The task's text for training a tokenizer: every message of `n` train demonstrations.

        One line per message content, per rendered tool call (GLM format) and per tool schema
        (as the chat template prints it), so the tokenizer sees exactly the task's text.
        """
        lines: list[str] = []
        for row in self.make_rows(n, seed, "train", **params):
            for tool in row.get("tools") or ():
                lines.append(json.dumps(tool.get("function", tool), ensure_ascii=False))
            for message in self.demonstration(row):
                if message.get("content"):
                    lines.append(str(message["content"]))
                for call in message.get("tool_calls") or ():
                    fn = call.get("function", call)
                    lines.append(render_tool_call(ToolCall(fn["name"], dict(fn["arguments"]))))
        return lines
