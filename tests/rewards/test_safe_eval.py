"""The safe arithmetic evaluator: exact values checked against Python's own arithmetic."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from rewards.safe_eval import SafeEvalError, SafeEvaluator, format_number


def random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return str(rng.randint(0, 999))
    op = rng.choice(["+", "-", "*", "/", "//", "%"])
    left, right = random_expression(rng, depth - 1), random_expression(rng, depth - 1)
    text = f"({left}){op}({right})"
    return f"-({text})" if rng.random() < 0.1 else text


def reference(expression: str) -> Fraction | float | None:
    """Python's own value of the expression with every literal made a Fraction (test only)."""
    import re

    wrapped = re.sub(r"(\d+)", r"Fraction(\1)", expression)
    try:
        return eval(wrapped, {"Fraction": Fraction})  # noqa: S307 - the reference, in a test
    except ZeroDivisionError:
        return None


def test_matches_python_on_random_expressions() -> None:
    rng = random.Random(0)
    evaluator = SafeEvaluator(max_length=10_000, max_nodes=10_000)
    checked = 0
    for _ in range(400):
        expression = random_expression(rng, 4)
        expected = reference(expression)
        if expected is None:
            with pytest.raises(SafeEvalError, match="division by zero"):
                evaluator.value(expression)
            continue
        got = evaluator.value(expression)
        if isinstance(expected, float):  # int / int after a // is a float in Python
            assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12), expression
        else:
            assert got == expected, expression
        checked += 1
    assert checked > 300


@pytest.mark.parametrize(
    "expression, value",
    [
        ("4821*397", Fraction(1913937)),
        ("2**10", Fraction(1024)),
        ("2**-2", Fraction(1, 4)),
        ("-(3 - 5) * +2", Fraction(4)),
        ("1/3*3", Fraction(1)),
        ("0.1+0.2", Fraction(3, 10)),  # exact decimals, not binary floats
        ("7 // 2 + 7 % 2", Fraction(4)),
        ("(1)", Fraction(1)),
    ],
)
def test_values(expression: str, value: Fraction) -> None:
    assert SafeEvaluator().value(expression) == value


def test_literals_in_source_order() -> None:
    assert SafeEvaluator().evaluate("(50-25)*3+7").literals == (50, 25, 3, 7)


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("__import__('os').system('ls')", "Call is not allowed"),
        ("x + 1", "Name is not allowed"),
        ("'a' * 3", "literal 'a' is not allowed"),
        ("True + 1", "literal True is not allowed"),
        ("1j", "literal 1j is not allowed"),
        ("[1][0]", "is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("1 << 2", "operator LShift is not allowed"),
        ("1 +", "invalid syntax"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0**-1", "division by zero"),
        ("9**9**9", "exceeds the limit"),
        ("2**0.5", "only integer exponents"),
        ("9999999**50", "would exceed"),
        ("1e400", "not a finite number"),
        ("", "empty expression"),
        ("1+" * 200 + "1", "longer than"),
    ],
)
def test_rejections(expression: str, reason: str) -> None:
    with pytest.raises(SafeEvalError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        SafeEvaluator().value(expression)


def test_node_and_size_bounds() -> None:
    with pytest.raises(SafeEvalError, match="nodes"):
        SafeEvaluator(max_nodes=5).value("1+2+3+4")
    with pytest.raises(SafeEvalError, match="exceeds 64 bits"):
        SafeEvaluator(max_bits=64).value("4294967296*4294967296*2")


@pytest.mark.parametrize(
    "value, text",
    [
        (Fraction(1913937), "1913937"),
        (Fraction(-7, 2), "-3.5"),
        (Fraction(1, 3), "0.3333333333"),
        (Fraction(2, 3), "0.6666666667"),
        (Fraction(-1, 400), "-0.0025"),
    ],
)
def test_format_number(value: Fraction, text: str) -> None:
    assert format_number(value) == text
