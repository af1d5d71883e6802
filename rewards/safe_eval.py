"""A safe, exact arithmetic evaluator (never `eval`): the calculator tool and countdown use it.

The expression is parsed with `ast.parse(mode="eval")` and walked over a whitelist: number
literals (ints and decimals, no bools/complex/strings), ``+ - * / // % **``, parentheses and
unary ``+``/``-``. Everything else (names, calls, attributes, subscripts, comparisons, ...)
is rejected with `SafeEvalError`. Arithmetic is exact (`fractions.Fraction`), so ``1/3*3`` is
1 and countdown's "reaches the target" is an exact test.

Bounds, each a constructor argument: expression length, AST node count, |exponent| of ``**``
(integer exponents only), and the bit size of every intermediate numerator/denominator, so no
expression can take more than a moment or much memory.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Fraction], Fraction]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


class SafeEvalError(ValueError):
    """An expression that is not allowed or cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class Evaluation:
    """The exact value of an expression and the number literals it used, in source order."""

    value: Fraction
    literals: tuple[Fraction, ...]


@dataclass(frozen=True)
class SafeEvaluator:
    """Evaluate whitelisted arithmetic exactly. See the module docstring for the rules."""

    max_length: int = 200
    max_nodes: int = 100
    max_exponent: int = 64
    max_bits: int = 1024

    def evaluate(self, expression: str) -> Evaluation:
        """Parse and evaluate `expression`; SafeEvalError on anything not allowed."""
        text = expression.strip()
        if not text:
            raise SafeEvalError("empty expression")
        if len(text) > self.max_length:
            raise SafeEvalError(f"expression longer than {self.max_length} characters")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            # Python's own hints (";" onwards, e.g. "use an 0o prefix for octal integers")
            # suggest syntax this evaluator refuses, and a tool error must stay short: the
            # model reads it as an observation inside its token budget.
            raise SafeEvalError(f"invalid syntax: {exc.msg.split(';')[0]}") from exc
        nodes = sum(1 for _ in ast.walk(tree))
        if nodes > self.max_nodes:
            raise SafeEvalError(f"expression has {nodes} nodes, more than {self.max_nodes}")
        literals: list[Fraction] = []
        value = self._eval(tree.body, literals)
        return Evaluation(value=value, literals=tuple(literals))

    def value(self, expression: str) -> Fraction:
        """Just the exact value of `expression`."""
        return self.evaluate(expression).value

    def _eval(self, node: ast.AST, literals: list[Fraction]) -> Fraction:
        if isinstance(node, ast.Constant):
            number = self._check_size(_literal(node.value))
            literals.append(number)
            return number
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return Fraction(_UNARY[type(node.op)](self._eval(node.operand, literals)))
        if isinstance(node, ast.BinOp):
            left = self._eval(node.left, literals)
            right = self._eval(node.right, literals)
            if isinstance(node.op, ast.Pow):
                return self._check_size(self._power(left, right))
            if type(node.op) not in _BINARY:
                raise SafeEvalError(f"operator {type(node.op).__name__} is not allowed")
            if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
                raise SafeEvalError("division by zero")
            return self._check_size(Fraction(_BINARY[type(node.op)](left, right)))  # // gives int
        raise SafeEvalError(
            f"{type(node).__name__} is not allowed; only numbers and + - * / // % **"
        )

    def _power(self, base: Fraction, exponent: Fraction) -> Fraction:
        if exponent.denominator != 1:
            raise SafeEvalError("only integer exponents are allowed")
        if abs(exponent) > self.max_exponent:
            raise SafeEvalError(f"exponent {exponent} exceeds the limit {self.max_exponent}")
        if base == 0 and exponent < 0:
            raise SafeEvalError("division by zero (0 to a negative power)")
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
        if bits * abs(int(exponent)) > self.max_bits:
            raise SafeEvalError(f"result would exceed {self.max_bits} bits")
        return Fraction(base ** int(exponent))

    def _check_size(self, value: Fraction) -> Fraction:
        if max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > self.max_bits:
            raise SafeEvalError(f"intermediate result exceeds {self.max_bits} bits")
        return value


def _literal(value: object) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SafeEvalError(f"literal {value!r} is not allowed; only numbers")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SafeEvalError(f"literal {value!r} is not a finite number")
        return Fraction(repr(value))  # the decimal the user wrote, not the binary float
    return Fraction(value)


def format_number(value: Fraction, *, max_decimals: int = 10) -> str:
    """An int for integral values ("-12"), else a decimal rounded to `max_decimals` places."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(value * 10**max_decimals)
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled)).rjust(max_decimals + 1, "0")
    whole, frac = digits[:-max_decimals], digits[-max_decimals:].rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"
