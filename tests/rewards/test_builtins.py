"""Built-in text rewards: exact, numeric, math (math-verify), format, the toy tasks, env."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rewards.builtins.env import env_reward
from rewards.builtins.format import FormatReward
from rewards.builtins.match import exact_match, numeric_match
from rewards.builtins.math_answer import math_match
from rewards.builtins.numbers import find_numbers, leading_number, parse_number
from rewards.builtins.toy_tasks import (
    arithmetic_reward,
    calculator_task_reward,
    countdown_reward,
)
from rewards.protocol import RewardInputError
from tests.rewards.conftest import episode_with


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,234", Fraction(1234)),
        ("-3.50", Fraction(-7, 2)),
        ("3/4", Fraction(3, 4)),
        ("-6 / 8", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\dfrac{1}{3}", Fraction(-1, 3)),
        ("2.5e3", Fraction(2500)),
        (".5", Fraction(1, 2)),
        ("1,234,567.25", Fraction(123456725, 100)),
        ("1,23", None),
        ("abc", None),
        ("1/0", None),
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


def test_find_and_leading_numbers() -> None:
    assert find_numbers("pay 1,234 then 1, 2 and 3/4 of \\frac{1}{2}") == [
        1234,
        1,
        2,
        Fraction(3, 4),
        Fraction(1, 2),
    ]
    assert leading_number("  -12 apples") == -12
    assert leading_number("the answer is 5") is None


@pytest.mark.parametrize(
    "response, label, expected, options",
    [
        ("Paris", "Paris", 1.0, {}),
        ("  Paris \n", "Paris", 1.0, {}),
        ("paris", "Paris", 0.0, {}),
        ("paris", "Paris", 1.0, {"case_sensitive": False}),
        ("New   York", "New York", 1.0, {}),
        ("New   York", "New York", 0.0, {"collapse_whitespace": False}),
    ],
)
def test_exact(response: str, label: str, expected: float, options: dict) -> None:
    assert exact_match(episode_with(response, label=label), **options) == expected


@pytest.mark.parametrize(
    "response, label, expected, options",
    [
        ("so the total is 1,234.", "1234", 1.0, {}),
        ("3 apples, then -3.50", "-3.5", 1.0, {}),
        ("it is 3/4", "0.75", 1.0, {}),
        ("it is 0.7500001", "3/4", 1.0, {"rel_tol": 1e-6}),
        ("it is 0.76", "3/4", 0.0, {}),
        ("it is 0.76", "3/4", 1.0, {"abs_tol": 0.02}),
        ("12 then 13", "12", 0.0, {}),
        ("12 then 13", "12", 1.0, {"position": "first"}),
        ("no number", "5", 0.0, {}),
    ],
)
def test_numeric(response: str, label: str, expected: float, options: dict) -> None:
    assert numeric_match(episode_with(response, label=label), **options) == expected


def test_numeric_rejects_bad_label_and_position() -> None:
    with pytest.raises(RewardInputError, match="is not a number"):
        numeric_match(episode_with("1", label="one"))
    with pytest.raises(ValueError, match="position"):
        numeric_match(episode_with("1", label="1"), position="middle")


@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", 1.0),
        ("Thus $x = 0.5$, i.e. \\boxed{0.5}", "1/2", 1.0),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("I do not know", "4", 0.0),
    ],
)
def test_math_verify(response: str, label: str, expected: float) -> None:
    assert math_match(episode_with(response, label=label)) == expected


GOOD_CALL = (
    "<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>12*3</arg_value>\n"
    "</tool_call>"
)

NAMELESS_CALL = "<tool_call><arg_key>x</arg_key><arg_value>1</arg_value></tool_call>"


@pytest.mark.parametrize(
    "text, options, expected",
    [
        ("<think>a</think><answer>5</answer>", {"required_tags": ["think", "answer"]}, 1.0),
        ("<think>a</think>5", {"required_tags": ["think", "answer"]}, 0.0),
        ("<answer><answer>5</answer></answer>", {"required_tags": ["answer"]}, 0.0),
        ("</answer>5<answer>", {"required_tags": ["answer"]}, 0.0),
        ("Answer: 42", {"pattern": r"Answer: \d+$"}, 1.0),
        ("Answer: 42 ok", {"pattern": r"Answer: \d+", "full_match": True}, 0.0),
        (GOOD_CALL, {"tool_call": True}, 1.0),
        ("hm " + GOOD_CALL + GOOD_CALL.replace("\n", ""), {"tool_call": True}, 1.0),
        ("<tool_call>calculator</tool_call>", {"tool_call": True}, 1.0),
        ("no call at all", {"tool_call": True}, 0.0),
        ("<tool_call>calculator<arg_key>x</arg_key></tool_call>", {"tool_call": True}, 0.0),
        (NAMELESS_CALL, {"tool_call": True}, 0.0),
        (GOOD_CALL.replace("</tool_call>", ""), {"tool_call": True}, 0.0),
        ("<tool_call>a<tool_call>b</tool_call></tool_call>", {"tool_call": True}, 0.0),
    ],
)
def test_format(text: str, options: dict, expected: float) -> None:
    assert FormatReward(**options)(episode_with(text)) == expected


def test_format_needs_a_check() -> None:
    with pytest.raises(ValueError, match="at least one of"):
        FormatReward()


@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("95", "95", 1.0),
        (" 95 apples", "95", 1.0),
        ("955", "95", 0.0),
        ("-7", "-7", 1.0),
        ("is 95", "95", 0.0),
        ("", "95", 0.0),
    ],
)
def test_arithmetic(response: str, label: str, expected: float) -> None:
    assert arithmetic_reward(episode_with(response, label=label)) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("3*25+7", 1.0),
        ("(50-25)*3+7", 1.0),
        ("50+25+7", 1.0),  # not every number has to be used
        ("3 * 25 + 7 = 82\nbecause ...", 1.0),  # the text before "=" on the first line
        ("(7*50/25)*3+40", 0.0),  # 40 is not given
        ("3*25+7+3", 0.0),  # 3 used twice
        ("3*25+8", 0.0),  # 8 is not given
        ("50+25+3", 0.0),  # 78, not 82
        ("2**6+18", 0.0),  # ** is not a countdown operator
        ("__import__('os').system('ls')", 0.0),
        ("", 0.0),
    ],
)
def test_countdown(response: str, expected: float) -> None:
    episode = episode_with(response, label="82", numbers=[3, 7, 25, 50])
    assert countdown_reward(episode) == expected


def test_countdown_needs_numbers() -> None:
    with pytest.raises(RewardInputError, match="metadata\\['numbers'\\]"):
        countdown_reward(episode_with("1+1", label="2"))


@pytest.mark.parametrize(
    "final, expected",
    [
        ("1913937", 1.0),
        ("4821*397 = 1,913,937", 1.0),
        ("1913936", 0.0),
        (GOOD_CALL, 0.0),  # still calling the tool: no final answer
        ("I cannot tell", 0.0),
    ],
)
def test_calculator_task(final: str, expected: float) -> None:
    episode = episode_with("<tool_call>...</tool_call> ... " + final, label="1913937")
    episode.metadata["final_text"] = final
    assert calculator_task_reward(episode) == expected


def test_env_reward_passthrough() -> None:
    assert env_reward(episode_with("x", env_reward=0.25)) == 0.25
    assert env_reward(episode_with("x")) == 0.0
    with pytest.raises(RewardInputError, match="env_reward"):
        env_reward(episode_with("x"), default=None)
