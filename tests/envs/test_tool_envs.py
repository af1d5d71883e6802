"""The built-in tool environments and the ToolBox: every model mistake becomes an observation."""

from __future__ import annotations

import asyncio

import pytest

from envs.calculator import CalculatorEnv
from envs.python_sandbox import PythonSandboxEnv
from envs.search import SearchEnv
from envs.tasks import make_rows
from envs.tool_calls import ToolCall, render_tool_call
from envs.toolbox import Tool, ToolBox, ToolError


def call(name: str, **arguments) -> str:
    return "\n" + render_tool_call(ToolCall(name, arguments))


def step(env, text: str):
    result = env.step(text)
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


@pytest.fixture
def calculator() -> CalculatorEnv:
    env = CalculatorEnv()
    env.reset(make_rows("calculator", 1, seed=0)[0])
    return env


def test_calculator_computes_and_scores_the_final_answer(calculator: CalculatorEnv) -> None:
    row = make_rows("calculator", 1, seed=0)[0]
    expression = row["metadata"]["expression"]
    result = step(calculator, call("calculator", expression=expression))
    assert result.observations == [row["label"]] and not result.done and result.reward is None
    assert step(calculator, f"The answer is {row['label']}.").reward == 1.0
    assert step(calculator, "The answer is 12.").reward == 0.0
    assert step(calculator, "The answer is 12.").done


@pytest.mark.parametrize(
    "text, observation",
    [
        (call("calculator", expression="1/3"), "0.3333333333"),
        (call("calculator", expression="2**1000000"), "error: calculator: exponent 1000000"),
        (call("calculator", expression="__import__('os')"), "error: calculator: Call is not"),
        (call("calculator", expression="1/0"), "error: calculator: division by zero"),
        (call("calculator", expression=12), "12"),  # a JSON number is still an expression
        (call("calc", expression="1"), "error: unknown tool 'calc'; available: calculator"),
        (call("calculator", expr="1"), "error: calculator: missing required argument(s)"),
        (call("calculator", expression="1", x=2), "error: calculator: unknown argument(s) ['x']"),
        ("<tool_call>calculator<arg_key>expression</arg_key>", "error: tool call 1:"),
        ("</tool_call> oops", "error: stray </tool_call>"),
    ],
)
def test_calculator_errors_are_observations(
    calculator: CalculatorEnv, text: str, observation: str
) -> None:
    result = step(calculator, text)
    assert not result.done
    assert result.observations[0].startswith(observation), result.observations


def test_toolbox_limits_calls_and_output_and_survives_tool_bugs() -> None:
    schema = {"type": "function", "function": {"name": "echo", "parameters": {}}}

    def echo(arguments: dict) -> str:
        if arguments.get("crash"):
            raise KeyError("bug")
        if arguments.get("refuse"):
            raise ToolError("echo: refused")
        return "x" * int(arguments.get("n", 1))

    box = ToolBox([Tool(schema, echo)], max_calls=2, max_observation_chars=10)
    turn = asyncio.run(box.respond(call("echo", n=3) + call("echo", n=50) + call("echo")))
    assert turn.observations == [
        "xxx",
        "x" * 10 + "\n... (truncated)",
        "error: at most 2 tool calls per turn",
    ]
    box = ToolBox([Tool(schema, echo)])
    turn = asyncio.run(box.respond(call("echo", crash=True) + call("echo", refuse=True)))
    assert turn.observations == ["error: echo failed: KeyError: 'bug'", "error: echo: refused"]
    assert asyncio.run(box.respond("just text")).answered
    with pytest.raises(ValueError, match="unique"):
        ToolBox([Tool(schema, echo), Tool(schema, echo)])


def test_python_env_runs_code_in_the_sandbox() -> None:
    env = PythonSandboxEnv.factory(cpu_s=1, wall_s=10)()
    env.reset({"id": "q", "messages": [{"role": "user", "content": "2**100?"}]})
    result = step(env, call("python", code="print(2**100)"))
    assert result.observations == [str(2**100)] and not result.done
    crashed = step(env, call("python", code="print('partial')\nraise ValueError('nope')"))
    text = crashed.observations[0]
    assert text.startswith("partial\n") and "ValueError: nope" in text
    assert text.endswith("[exit status 1]")
    looped = step(env, call("python", code="while True:\n    pass"))
    assert looped.observations == ["[killed: cpu_limit]"]
    network = step(env, call("python", code="import socket\nsocket.socket()"))
    assert "PermissionError: sandbox: socket.__new__" in network.observations[0]
    final = step(env, "It is 1267650600228229401496703205376.")
    assert final.done and final.reward is None


def test_search_env_retrieves_and_scores() -> None:
    env = SearchEnv.factory(top_k=2)()
    env.reset({"id": "q", "messages": [{"role": "user", "content": "x"}], "label": "Canberra"})
    result = step(env, call("search", query="capital of Australia"))
    first = result.observations[0].splitlines()[0]
    assert first.startswith("[doc026] Australia:") and "Canberra" in first
    assert len(result.observations[0].splitlines()) == 2
    assert step(env, call("search", query="zzzz qqqq")).observations == ["no results"]
    assert step(env, call("search", query="  ")).observations == [
        "error: search: the query is empty"
    ]
    assert step(env, "The capital is  canberra.").reward == 1.0
    assert step(env, "The capital is Sydney.").reward == 0.0
