"""A format reward: 1.0 when the text passes every configured check, else 0.0.

Checks (each optional, all must pass):

* ``pattern``: a regular expression that must match (``re.search``; ``full_match=True`` for
  ``re.fullmatch``; compiled with DOTALL);
* ``required_tags``: tag names like ``"think"`` or ``"answer"`` that must appear as balanced,
  non-nested ``<tag>...</tag>`` pairs (at least one pair each);
* ``tool_call``: at least one GLM-4.5 tool call, and every ``<tool_call>`` block well formed:
  ``<tool_call>NAME`` then zero or more ``<arg_key>K</arg_key><arg_value>V</arg_value>``
  pairs, then ``</tool_call>`` (whitespace allowed between parts). This is a syntactic check;
  the full parser (JSON argument decoding, error messages) is `envs.tool_calls`.

``text`` picks what is checked: ``"response"`` (the whole decoded response, the default) or
``"final"`` (the last model turn of a multi-turn episode).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from buffer.episode import Episode
from rewards.protocol import final_text, response_text

_TEXTS: dict[str, Callable[[Episode], str]] = {"response": response_text, "final": final_text}
_TOOL_CALL = re.compile(
    r"<tool_call>\s*[^<>\s]+\s*"
    r"(?:<arg_key>[^<>]+</arg_key>\s*<arg_value>(?:(?!</?arg_value>|</?tool_call>).)*</arg_value>\s*)*"
    r"</tool_call>",
    re.DOTALL,
)
_TAG_NAME = re.compile(r"[A-Za-z_][\w:.-]*")


def tags_balanced(text: str, tag: str) -> bool:
    """True when `<tag>`/`</tag>` occur as >= 1 properly ordered, non-nested pairs."""
    marks = re.findall(rf"<(/?){re.escape(tag)}>", text)
    if not marks:
        return False
    expected = ["", "/"] * (len(marks) // 2)
    return len(marks) % 2 == 0 and marks == expected


def tool_calls_well_formed(text: str) -> bool:
    """True when the text has >= 1 tool call and every `<tool_call>` block is well formed."""
    opened = text.count("<tool_call>")
    if opened == 0 or opened != text.count("</tool_call>"):
        return False
    return len(_TOOL_CALL.findall(text)) == opened


class FormatReward:
    """Configured once (see module doc); called per episode."""

    def __init__(
        self,
        *,
        pattern: str | None = None,
        full_match: bool = False,
        required_tags: Sequence[str] = (),
        tool_call: bool = False,
        text: str = "response",
    ) -> None:
        if text not in _TEXTS:
            raise ValueError(f"text: expected one of {sorted(_TEXTS)}, got {text!r}")
        bad = [t for t in required_tags if not _TAG_NAME.fullmatch(t)]
        if bad:
            raise ValueError(f"required_tags: {bad} are not tag names (e.g. 'think')")
        if pattern is None and not required_tags and not tool_call:
            raise ValueError("format reward: set at least one of pattern, required_tags, tool_call")
        try:
            self.pattern = re.compile(pattern, re.DOTALL) if pattern is not None else None
        except re.error as exc:
            raise ValueError(f"pattern: invalid regular expression {pattern!r}: {exc}") from exc
        self.full_match = full_match
        self.required_tags = tuple(required_tags)
        self.tool_call = tool_call
        self._text = _TEXTS[text]

    def __call__(self, episode: Episode) -> float:
        return float(self.check(self._text(episode)))

    def check(self, text: str) -> bool:
        """Whether `text` passes every configured check."""
        if self.pattern is not None:
            match = self.pattern.fullmatch if self.full_match else self.pattern.search
            if match(text) is None:
                return False
        if not all(tags_balanced(text, tag) for tag in self.required_tags):
            return False
        return not self.tool_call or tool_calls_well_formed(text)
