"""GLM-4.5/4.6 tool calls: parse them out of generated text and render them back.

The format (what the GLM chat template renders and what GLM models emit)::

    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    ...
    </tool_call>

Whitespace (newlines) between the name and the tags and between the tags is optional.
Argument values that are valid JSON (numbers, booleans, objects, lists, quoted strings) are
decoded as JSON; anything else is kept verbatim as a string -- the same rule as SGLang's
GLM-4.5 detector when the value's type is unknown. When the tool schemas are passed, a
parameter declared ``"type": "string"`` is always kept verbatim (so ``"123"`` stays a string).

`parse_tool_calls` never raises on model output: a malformed call (unclosed tag, key without
value, empty name, nested tags, stray text) becomes a message in `ParsedTurn.errors` and is
left out of `ParsedTurn.calls`, so the environment can answer it with an error observation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"

_ANY_TAG = re.compile(r"</?(?:tool_call|arg_key|arg_value)>")
_EXCERPT = 40


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function name and its decoded arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParsedTurn:
    """A model turn split into its prose and its tool calls.

    content  the text outside tool calls, stripped at both ends
    calls    the well-formed calls, in order
    errors   one readable message per malformed call or stray tag (empty when all is well)
    """

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class _CallError(Exception):
    """A malformed call body; caught inside the parser and turned into a `ParsedTurn` error."""


def _excerpt(text: str) -> str:
    text = text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."
    return repr(text)


def string_parameters(tools: Iterable[Mapping[str, Any]] | None) -> dict[str, set[str]]:
    """Function name -> names of its parameters declared ``"type": "string"``.

    `tools` are JSON schemas, either OpenAI-style ``{"type": "function", "function": {...}}``
    or the bare function ``{"name", "description", "parameters"}``.
    """
    found: dict[str, set[str]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        properties = (fn.get("parameters") or {}).get("properties") or {}
        found[str(fn.get("name", ""))] = {
            key
            for key, spec in properties.items()
            if isinstance(spec, Mapping) and spec.get("type") == "string"
        }
    return found


def _decode_value(raw: str, keep_string: bool) -> Any:
    if keep_string:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_name(head: str) -> str:
    name = head.strip()
    if not name:
        raise _CallError("empty function name after <tool_call>")
    if any(ch.isspace() for ch in name):
        raise _CallError(f"function name {_excerpt(name)} contains whitespace")
    return name


def _expect_blank(text: str, where: str) -> None:
    if text.strip():
        raise _CallError(f"unexpected text {_excerpt(text.strip())} {where}")


def _parse_arguments(body: str, start: int, string_keys: set[str]) -> dict[str, Any]:
    """Parse ``(<arg_key>K</arg_key> <arg_value>V</arg_value>)*`` from body[start:]."""
    arguments: dict[str, Any] = {}
    tags = list(_ANY_TAG.finditer(body, start))
    expected = (KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)
    pos, key = start, None
    for i, tag in enumerate(tags):
        want = expected[i % 4]
        between = body[pos : tag.start()]
        if tag.group(0) != want:
            if want == VALUE_OPEN:
                raise _CallError(f"argument {key!r} has no <arg_value> (found {tag.group(0)})")
            raise _CallError(f"expected {want} but found {tag.group(0)}")
        if want == KEY_CLOSE:
            key = between.strip()
            if not key:
                raise _CallError("empty <arg_key></arg_key>")
            if key in arguments:
                raise _CallError(f"argument {key!r} given twice")
        elif want == VALUE_CLOSE:
            arguments[key] = _decode_value(between, key in string_keys)
            key = None
        else:
            _expect_blank(between, f"before {want}")
        pos = tag.end()
    state = len(tags) % 4
    if state == 1:
        raise _CallError("<arg_key> is not closed by </arg_key>")
    if state == 2:
        raise _CallError(f"argument {key!r} has no <arg_value>")
    if state == 3:
        raise _CallError(f"<arg_value> of argument {key!r} is not closed by </arg_value>")
    _expect_blank(body[pos:], "after the last argument")
    return arguments


def _parse_call(body: str, strings: dict[str, set[str]]) -> ToolCall:
    first = _ANY_TAG.search(body)
    head_end = first.start() if first else len(body)
    name = _parse_name(body[:head_end])
    return ToolCall(name, _parse_arguments(body, head_end, strings.get(name, set())))


def _find_close(text: str, start: int) -> tuple[int, bool]:
    """Index of the </tool_call> closing the call opened before `start` (-1 if none), nested?"""
    depth, nested = 1, False
    for tag in _ANY_TAG.finditer(text, start):
        if tag.group(0) == CALL_OPEN:
            depth, nested = depth + 1, True
        elif tag.group(0) == CALL_CLOSE:
            depth -= 1
            if depth == 0:
                return tag.start(), nested
    return -1, nested


def parse_tool_calls(text: str, tools: Iterable[Mapping[str, Any]] | None = None) -> ParsedTurn:
    """Split a model turn into prose and GLM tool calls; never raises on malformed input.

    `tools` (optional) are the JSON schemas the model was given; parameters they declare as
    strings are kept verbatim instead of being JSON-decoded.
    """
    strings = string_parameters(tools)
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos, number = 0, 0
    while (tag := _ANY_TAG.search(text, pos)) is not None:
        if tag.group(0) != CALL_OPEN:
            errors.append(f"stray {tag.group(0)} outside a tool call at character {tag.start()}")
            content.append(text[pos : tag.end()])
            pos = tag.end()
            continue
        number += 1
        content.append(text[pos : tag.start()])
        close, nested = _find_close(text, tag.end())
        if close < 0:
            errors.append(f"tool call {number}: <tool_call> is not closed by </tool_call>")
            pos = len(text)
            break
        pos = close + len(CALL_CLOSE)
        if nested:
            errors.append(f"tool call {number}: nested <tool_call> inside a tool call")
            continue
        try:
            calls.append(_parse_call(text[tag.end() : close], strings))
        except _CallError as err:
            errors.append(f"tool call {number}: {err}")
    content.append(text[pos:])
    return ParsedTurn(content="".join(content).strip(), calls=calls, errors=errors)


def _render_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render_tool_call(call: ToolCall) -> str:
    """The GLM-4.5 text of one call, exactly as the chat template renders it (no leading newline).

    Raises ValueError for a call the format cannot carry (empty name or key, whitespace in the
    name, a tag inside a key or value). Inverse of `parse_tool_calls` up to JSON decoding: a
    string value that is itself valid JSON (e.g. "12") parses back as JSON unless the tool
    schema declares it a string.
    """
    name = call.name
    if not name or any(ch.isspace() for ch in name) or _ANY_TAG.search(name):
        raise ValueError(f"ToolCall.name: expected a non-empty name without spaces, got {name!r}")
    parts = [f"{CALL_OPEN}{name}\n"]
    for key, value in call.arguments.items():
        text = _render_value(value)
        if not str(key).strip() or _ANY_TAG.search(str(key)) or _ANY_TAG.search(text):
            raise ValueError(
                f"ToolCall.arguments[{key!r}]: key or value contains a tool-call tag or is empty"
            )
        parts.append(f"{KEY_OPEN}{key}{KEY_CLOSE}\n{VALUE_OPEN}{text}{VALUE_CLOSE}\n")
    parts.append(CALL_CLOSE)
    return "".join(parts)
