"""One reward per toy task (envs/tasks): arithmetic, countdown, calculator_task.

Each is a pure text scorer (``*_score``, reused by environments) plus the Episode plugin.

* arithmetic: 1.0 when the response STARTS with the label's number ("95" for "37+58=";
  "95 apples" counts, "955" and "the answer is 95" do not).
* countdown: 1.0 when the answer (first line, text before any "=") is an expression over
  + - * / and parentheses that uses each given number at most once (``metadata["numbers"]``)
  and evaluates exactly to the target (``metadata["label"]``), by `rewards.safe_eval`.
* calculator_task: 1.0 when the final model turn has no tool call and its last number equals
  the label exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from buffer.episode import Episode
from rewards.builtins.numbers import find_numbers, leading_number, parse_number
from rewards.protocol import RewardInputError, final_text, label
from rewards.safe_eval import SafeEvalError, SafeEvaluator

_COUNTDOWN_EVALUATOR = SafeEvaluator(max_length=100, max_nodes=60)
_COUNTDOWN_FORBIDDEN = ("**", "//", "%")


def _label_number(text: str) -> Fraction:
    value = parse_number(text)
    if value is None:
        raise RewardInputError(f"metadata['label'] = {text!r} is not a number")
    return value


def arithmetic_score(text: str, expected: str) -> float:
    """1.0 when `text` starts with the number `expected`."""
    return float(leading_number(text) == _label_number(expected))


def countdown_score(text: str, numbers: Sequence[int], target: str) -> float:
    """1.0 when `text` is a valid countdown solution for `numbers` and `target`."""
    lines = text.strip().splitlines()
    expression = lines[0].split("=")[0] if lines else ""
    if not expression.strip() or any(op in expression for op in _COUNTDOWN_FORBIDDEN):
        return 0.0
    try:
        evaluation = _COUNTDOWN_EVALUATOR.evaluate(expression)
    except SafeEvalError:
        return 0.0
    available = Counter(Fraction(n) for n in numbers)
    used = Counter(evaluation.literals)
    if any(count > available[value] for value, count in used.items()):
        return 0.0
    return float(evaluation.value == _label_number(target))


def calculator_answer_score(text: str, expected: str) -> float:
    """1.0 when `text` (a final answer, not a tool call) ends with the number `expected`."""
    if "<tool_call>" in text:
        return 0.0
    numbers = find_numbers(text)
    return float(bool(numbers) and numbers[-1] == _label_number(expected))


def arithmetic_reward(episode: Episode) -> float:
    """The arithmetic task's reward (see module doc)."""
    return arithmetic_score(final_text(episode), label(episode))


def countdown_reward(episode: Episode) -> float:
    """The countdown task's reward; needs metadata["numbers"] (from the task row)."""
    numbers = episode.metadata.get("numbers")
    if not isinstance(numbers, list) or not all(isinstance(n, int) for n in numbers):
        raise RewardInputError(f"metadata['numbers']: expected a list of ints, got {numbers!r}")
    return countdown_score(final_text(episode), numbers, label(episode))


def calculator_task_reward(episode: Episode) -> float:
    """The calculator tool task's reward: the final answer equals the label."""
    return calculator_answer_score(final_text(episode), label(episode))
