"""Find and parse numbers in model text: "1,234", "-3.50", "3/4", "1e-3", "\\frac{3}{4}".

Values are exact `Fraction`s, so comparisons with a tolerance of 0 are exact. Thousands
separators are accepted only in groups of three ("1,234,567"), so "1,2" is two numbers.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = (
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"|[-+]?\.\d+(?:[eE][-+]?\d+)?"
)
_FRACTION = rf"(?:{_NUMBER})\s*/\s*(?:{_NUMBER})"
_LATEX_FRACTION = r"[-+]?\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*([-+]?\d+)\s*\}"
NUMBER_RE = re.compile(rf"{_LATEX_FRACTION}|{_FRACTION}|{_NUMBER}")
_ANSWER_START = re.compile(r"\s*[-+]?\.?\d")


def parse_number(text: str) -> Fraction | None:
    """The exact value of one number written as text, or None if `text` is not one number."""
    text = text.strip()
    latex = re.fullmatch(_LATEX_FRACTION, text)
    if latex:
        sign = -1 if text.startswith("-") else 1
        numerator, denominator = int(latex.group(1)), int(latex.group(2))
        return None if denominator == 0 else sign * Fraction(numerator, denominator)
    if "/" in text:
        parts = text.split("/")
        if len(parts) != 2:
            return None
        top, bottom = parse_number(parts[0]), parse_number(parts[1])
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom
    if not re.fullmatch(_NUMBER, text):
        return None
    return Fraction(text.replace(",", ""))


def find_numbers(text: str) -> list[Fraction]:
    """Every number in `text`, in order (fractions and LaTeX fractions count as one)."""
    found = []
    for match in NUMBER_RE.finditer(text):
        value = parse_number(match.group(0))
        if value is not None:
            found.append(value)
    return found


def leading_number(text: str) -> Fraction | None:
    """The number the text starts with (after whitespace), or None."""
    if not _ANSWER_START.match(text):
        return None
    match = NUMBER_RE.match(text.lstrip())
    return parse_number(match.group(0)) if match else None


def close_enough(a: Fraction, b: Fraction, *, rel_tol: float, abs_tol: float) -> bool:
    """|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol), computed exactly."""
    diff = abs(a - b)
    return diff <= max(Fraction(rel_tol) * max(abs(a), abs(b)), Fraction(abs_tol))
