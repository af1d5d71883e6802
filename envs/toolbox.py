"""Run the tool calls of one model turn: parse, dispatch by name, turn every failure into text.

Tool environments compose a `ToolBox` (one per environment instance). For a model turn:

* no tool call and no malformed call -> the turn is a final answer (`ToolTurn.answered`);
* each malformed call (per `envs.tool_calls.parse_tool_calls`) -> an ``error: ...``
  observation, so the model reads what was wrong and can retry;
* each well-formed call -> its tool's output; an unknown tool, a missing or unexpected
  argument, a tool that raises, or more calls than `max_calls` -> an ``error: ...``
  observation. Nothing a model writes makes `respond` raise.

Observations are truncated to `max_observation_chars`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envs.tool_calls import ParsedTurn, ToolCall, parse_tool_calls

logger = logging.getLogger(__name__)

ToolFn = Callable[[dict[str, Any]], str | Awaitable[str]]


class ToolError(Exception):
    """Raised by a tool for a bad input; its message is shown to the model as the result."""


@dataclass(frozen=True)
class Tool:
    """A tool: its OpenAI-style schema ``{"type": "function", "function": {...}}`` and code."""

    schema: Mapping[str, Any]
    fn: ToolFn

    @property
    def name(self) -> str:
        return str(self.schema.get("function", self.schema)["name"])

    @property
    def parameters(self) -> Mapping[str, Any]:
        return self.schema.get("function", self.schema).get("parameters", {})


@dataclass
class ToolTurn:
    """What a model turn amounted to.

    answered      no tool call and nothing malformed: the turn is a final answer
    observations  one string per call or error, in order (empty when answered)
    parsed        the parser's view of the turn (content, calls, errors)
    """

    answered: bool
    observations: list[str] = field(default_factory=list)
    parsed: ParsedTurn | None = None


class ToolBox:
    """A set of tools answering the calls of one model turn (see module doc)."""

    def __init__(
        self, tools: Sequence[Tool], *, max_calls: int = 4, max_observation_chars: int = 2000
    ) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: names must be unique, got {names}")
        self.tools = {t.name: t for t in tools}
        self.max_calls = max_calls
        self.max_observation_chars = max_observation_chars

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [dict(t.schema) for t in self.tools.values()]

    async def respond(self, text: str) -> ToolTurn:
        """Parse `text` and run its calls; never raises for anything in `text`."""
        parsed = parse_tool_calls(text, self.schemas)
        if not parsed.calls and not parsed.errors:
            return ToolTurn(answered=True, parsed=parsed)
        observations = [f"error: {message}" for message in parsed.errors]
        for index, call in enumerate(parsed.calls):
            if index >= self.max_calls:
                observations.append(f"error: at most {self.max_calls} tool calls per turn")
                break
            observations.append(self._truncate(await self._run(call)))
        return ToolTurn(answered=False, observations=observations, parsed=parsed)

    async def _run(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool {call.name!r}; available: {', '.join(self.tools)}"
        problem = _argument_problem(tool, call.arguments)
        if problem:
            return f"error: {call.name}: {problem}"
        try:
            result = tool.fn(dict(call.arguments))
            if inspect.isawaitable(result):
                result = await result
            return str(result)
        except ToolError as exc:
            return f"error: {exc}"
        except Exception as exc:  # noqa: BLE001 - a tool bug must not end the episode
            logger.warning("tool %s raised on %r", call.name, call.arguments, exc_info=True)
            return f"error: {call.name} failed: {type(exc).__name__}: {exc}"

    def _truncate(self, text: str) -> str:
        if len(text) <= self.max_observation_chars:
            return text
        return text[: self.max_observation_chars] + "\n... (truncated)"


def _argument_problem(tool: Tool, arguments: Mapping[str, Any]) -> str | None:
    properties = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", ()) if k not in arguments]
    if missing:
        return f"missing required argument(s) {missing}"
    unknown = sorted(set(arguments) - set(properties)) if properties else []
    if unknown:
        return f"unknown argument(s) {unknown}; expected {sorted(properties)}"
    return None
