"""The calculator tool environment, serving the toy calculator task (envs/tasks/calculator).

Tool ``calculator(expression)``: evaluated by `rewards.safe_eval.SafeEvaluator` (an AST
whitelist of numbers, + - * / // % ** and parentheses; exact arithmetic; never `eval`); the
observation is the value ("1913937", "0.3333333333") or ``error: ...``. The episode is done
when the model answers without a tool call; the reward is then the `calculator_task` reward
of that answer against the row's label (1.0 when its last number equals the label).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envs.base import StepResult, row_label, row_messages
from envs.tasks.calculator import CALCULATOR_TOOL
from envs.toolbox import Tool, ToolBox, ToolError
from rewards.builtins.toy_tasks import calculator_answer_score
from rewards.safe_eval import SafeEvalError, SafeEvaluator, format_number


class CalculatorEnv:
    """One episode of calculator tool use (see module doc)."""

    def __init__(self, *, max_calls: int = 4, max_expression_chars: int = 200) -> None:
        self.evaluator = SafeEvaluator(max_length=max_expression_chars)
        self.toolbox = ToolBox([Tool(CALCULATOR_TOOL, self._calculate)], max_calls=max_calls)
        self.tools: list[dict[str, Any]] | None = self.toolbox.schemas
        self.label: str | None = None

    def reset(self, task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.label = row_label(task_row)
        return row_messages(task_row)

    async def step(self, assistant_text: str) -> StepResult:
        turn = await self.toolbox.respond(assistant_text)
        if not turn.answered:
            return StepResult(observations=turn.observations)
        reward = None if self.label is None else calculator_answer_score(assistant_text, self.label)
        return StepResult(reward=reward, done=True)

    def _calculate(self, arguments: dict[str, Any]) -> str:
        expression = str(arguments["expression"])
        try:
            return format_number(self.evaluator.value(expression))
        except SafeEvalError as exc:
            raise ToolError(f"calculator: {exc}") from exc
