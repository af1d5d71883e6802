"""Exact-match and numeric-match rewards against metadata["label"].

`exact`: 1.0 when the answer text equals the label (after stripping, optionally ignoring
case and collapsing inner whitespace), else 0.0. `numeric`: 1.0 when the chosen number in the
answer ("last" by default, or "first") is within tolerance of the label's number; numbers
may be written "1,234", "-3.50", "3/4", "\\frac{3}{4}" or "2.5e3". Both read the final model
turn (`final_text`), which in a single-turn episode is the whole response.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from buffer.episode import Episode
from rewards.builtins.numbers import close_enough, find_numbers, leading_number, parse_number
from rewards.protocol import RewardInputError, final_text, label


def _normalise(text: str, *, case_sensitive: bool, collapse_whitespace: bool) -> str:
    text = text.strip()
    if collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    return text if case_sensitive else text.casefold()


def exact_match(
    episode: Episode, *, case_sensitive: bool = True, collapse_whitespace: bool = True
) -> float:
    """1.0 when the final text equals metadata["label"] (normalised as configured)."""
    options = {"case_sensitive": case_sensitive, "collapse_whitespace": collapse_whitespace}
    answer = _normalise(final_text(episode), **options)
    return float(answer == _normalise(label(episode), **options))


def _last(text: str) -> Fraction | None:
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


_PICKERS: dict[str, Callable[[str], Fraction | None]] = {"last": _last, "first": leading_number}


def numeric_match(
    episode: Episode, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9, position: str = "last"
) -> float:
    """1.0 when the answer's number (`position`: "last" or "first") matches the label's."""
    if position not in _PICKERS:
        raise ValueError(f"position: expected one of {sorted(_PICKERS)}, got {position!r}")
    expected = parse_number(label(episode))
    if expected is None:
        raise RewardInputError(f"metadata['label'] = {label(episode)!r} is not a number")
    got = _PICKERS[position](final_text(episode))
    if got is None:
        return 0.0
    return float(close_enough(got, expected, rel_tol=rel_tol, abs_tol=abs_tol))
