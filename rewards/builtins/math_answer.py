"""Math answer checking with HuggingFace `math-verify`: boxed answers, fractions, LaTeX.

The label (gold; a bare label without ``$`` or ``\\boxed`` is read as inline LaTeX math)
and the final model text are both parsed by `math_verify.parse` (LaTeX and
plain-expression extraction: ``\\boxed{\\frac{1}{2}}``, ``$0.5$``, ``1/2`` all become 1/2) and
compared by `math_verify.verify` (symbolic and numeric equality). 1.0 on a match, else 0.0.

math-verify's own timeouts use SIGALRM, which only works on the main thread; this plugin runs
in `RewardFn`'s worker threads, so they are disabled here and `RewardFn`'s per-call timeout
bounds the call instead (a runaway sympy computation keeps its thread until it finishes).
"""

from __future__ import annotations

from buffer.episode import Episode
from rewards.protocol import RewardInputError, final_text, label


def math_match(episode: Episode, *, float_rounding: int = 6, strict: bool = True) -> float:
    """1.0 when the final text's answer equals metadata["label"] mathematically."""
    from math_verify import parse, verify  # heavy (sympy): imported when first used

    reference = label(episode)
    if "$" not in reference and "\\boxed" not in reference:
        reference = f"${reference}$"  # a bare label ("x^2+1", "1/2") is read as LaTeX math
    gold = parse(reference, parsing_timeout=None)
    if not gold:
        raise RewardInputError(f"metadata['label'] = {label(episode)!r} has no parsable answer")
    answer = parse(final_text(episode), parsing_timeout=None)
    if not answer:
        return 0.0
    matched = verify(
        gold, answer, float_rounding=float_rounding, strict=strict, timeout_seconds=None
    )
    return float(matched)
