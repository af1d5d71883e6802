"""A calculator agent written only with the `openai` client (no Physarum import).

`solve(client, task)` asks the model the task's question with one tool, ``calculator``,
through OpenAI function calling; runs every tool call the model makes (a small exact
evaluator of + - * and parentheses); hands the results back as ``tool`` messages; and returns
1.0 when the final answer's last number equals ``task["label"]``, else 0.0. Physarum trains
the tokens the model sampled in these calls (`env.agent`, configs/toy_openai_agent.yaml).

The task is a row of the toy `calculator` task: ``{"messages": [system, user "4821*397="],
"label": "1913937", ...}``. The model name is not checked by Physarum's endpoint.
"""

from __future__ import annotations

import ast
import json
import operator
import re

import openai

MAX_TURNS = 3
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "e.g. 12*(3+4)"},
            },
            "required": ["expression"],
        },
    },
}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_NUMBER = re.compile(r"-?\d+")


def calculate(expression: str) -> str:
    """The exact value of an integer expression of + - * and parentheses, or 'error: ...'."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"unsupported: {ast.dump(node)[:40]}")

    if len(expression) > 100:
        return "error: expression too long"
    try:
        return str(value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, RecursionError) as exc:
        return f"error: {exc}"


def _tool_result(call: openai.types.chat.ChatCompletionMessageToolCall) -> str:
    if call.function.name != "calculator":
        return f"error: unknown tool {call.function.name!r}"
    try:
        return calculate(str(json.loads(call.function.arguments)["expression"]))
    except (ValueError, KeyError, TypeError) as exc:
        return f"error: bad arguments: {exc}"


async def solve(client: openai.AsyncOpenAI, task: dict) -> float:
    """1.0 when the model's final answer is the task's label (see module doc)."""
    messages: list[dict] = list(task["messages"])
    for _ in range(MAX_TURNS):
        try:
            response = await client.chat.completions.create(
                model="policy", messages=messages, tools=[CALCULATOR], max_tokens=32
            )
        except openai.BadRequestError as exc:
            if exc.param == "messages":  # the conversation outgrew the model's context
                return 0.0
            raise
        message = response.choices[0].message
        if not message.tool_calls:
            numbers = _NUMBER.findall(message.content or "")
            return float(bool(numbers) and numbers[-1] == str(task["label"]))
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": _tool_result(call)}
            )
    return 0.0
