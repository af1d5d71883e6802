"""GLM-4.5 tool-call parsing: well-formed calls, JSON argument decoding, malformed input."""

from __future__ import annotations

import pytest

from envs.tasks import CALCULATOR_TOOL, TASKS, make_rows
from envs.tool_calls import ToolCall, parse_tool_calls, render_tool_call

GOOD = [
    # (text, content, calls)
    ("The answer is 4.", "The answer is 4.", []),
    (
        "<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>12*34</arg_value>\n</tool_call>",
        "",
        [ToolCall("calculator", {"expression": "12*34"})],
    ),
    (  # GLM-4.7 style: no whitespace at all
        "<tool_call>calculator<arg_key>expression</arg_key><arg_value>1+1</arg_value></tool_call>",
        "",
        [ToolCall("calculator", {"expression": "1+1"})],
    ),
    (  # prose around, spaces and blank lines between tags, stripped key and name
        "Let me compute.\n<tool_call> search \n\n<arg_key> query </arg_key>  \n"
        "<arg_value>GLM tokenizer</arg_value>\n\n</tool_call>\nDone.",
        "Let me compute.\n\nDone.",
        [ToolCall("search", {"query": "GLM tokenizer"})],
    ),
    (  # JSON values decoded: int, float, bool, null, object, list, quoted string
        "<tool_call>f\n<arg_key>n</arg_key>\n<arg_value>42</arg_value>\n"
        "<arg_key>x</arg_key>\n<arg_value>-2.5e3</arg_value>\n"
        "<arg_key>b</arg_key>\n<arg_value>true</arg_value>\n"
        "<arg_key>z</arg_key>\n<arg_value>null</arg_value>\n"
        '<arg_key>o</arg_key>\n<arg_value>{"k": [1, 2]}</arg_value>\n'
        '<arg_key>l</arg_key>\n<arg_value>[1, "a"]</arg_value>\n'
        '<arg_key>q</arg_key>\n<arg_value>"quoted"</arg_value>\n</tool_call>',
        "",
        [
            ToolCall(
                "f",
                {
                    "n": 42,
                    "x": -2500.0,
                    "b": True,
                    "z": None,
                    "o": {"k": [1, 2]},
                    "l": [1, "a"],
                    "q": "quoted",
                },
            )
        ],
    ),
    (  # non-JSON values are kept verbatim, whitespace included
        "<tool_call>f\n<arg_key>s</arg_key>\n<arg_value> two words \n</arg_value>\n</tool_call>",
        "",
        [ToolCall("f", {"s": " two words \n"})],
    ),
    (  # a call without arguments
        "<tool_call>get_time\n</tool_call>",
        "",
        [ToolCall("get_time", {})],
    ),
    (  # two calls in one turn
        "<tool_call>a\n<arg_key>k</arg_key>\n<arg_value>1</arg_value>\n</tool_call>\n"
        "<tool_call>b\n<arg_key>k</arg_key>\n<arg_value>x</arg_value>\n</tool_call>",
        "",
        [ToolCall("a", {"k": 1}), ToolCall("b", {"k": "x"})],
    ),
    (  # non-ASCII name text and values
        "<tool_call>weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>",
        "",
        [ToolCall("weather", {"city": "北京"})],
    ),
]


@pytest.mark.parametrize(("text", "content", "calls"), GOOD)
def test_parses_well_formed_turns(text: str, content: str, calls: list[ToolCall]) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.errors == []
    assert parsed.ok
    assert parsed.content == content
    assert parsed.calls == calls


MALFORMED = [
    # (text, fragment of the error message, number of good calls kept)
    ("<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>1+1", "not closed", 0),
    (
        "<tool_call>\n<arg_key>k</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
        "empty function name",
        0,
    ),
    ("<tool_call>   </tool_call>", "empty function name", 0),
    ("<tool_call>f\n<arg_key>k</arg_key>\n</tool_call>", "argument 'k' has no <arg_value>", 0),
    (
        "<tool_call>f\n<arg_key>k</arg_key><arg_key>j</arg_key></tool_call>",
        "'k' has no <arg_value>",
        0,
    ),
    ("<tool_call>f\n<arg_value>1</arg_value>\n</tool_call>", "expected <arg_key>", 0),
    ("<tool_call>f\n<arg_key>k\n<arg_value>1</arg_value></tool_call>", "expected </arg_key>", 0),
    (
        "<tool_call>f\n<arg_key>k</arg_key>\n<arg_value>1\n</tool_call>",
        "not closed by </arg_value>",
        0,
    ),
    (
        "<tool_call>f<arg_key>k</arg_key><arg_value>1</arg_value></arg_value></tool_call>",
        "found </arg_value>",
        0,
    ),
    ("<tool_call>f<arg_key></arg_key><arg_value>1</arg_value></tool_call>", "empty <arg_key>", 0),
    (
        "<tool_call>f<arg_key>k</arg_key><arg_value>1</arg_value>"
        "<arg_key>k</arg_key><arg_value>2</arg_value></tool_call>",
        "given twice",
        0,
    ),
    ("<tool_call>f g\n<arg_key>k</arg_key><arg_value>1</arg_value></tool_call>", "whitespace", 0),
    (
        "<tool_call>f<arg_key>k</arg_key> junk <arg_value>1</arg_value></tool_call>",
        "unexpected text 'junk'",
        0,
    ),
    (
        "<tool_call>f<arg_key>k</arg_key><arg_value>1</arg_value> trailing</tool_call>",
        "after the last argument",
        0,
    ),
    (
        "<tool_call>outer\n<tool_call>inner\n</tool_call>\n</tool_call>",
        "nested <tool_call>",
        0,
    ),
    ("text </tool_call> more", "stray </tool_call>", 0),
    ("<arg_key>k</arg_key>", "stray <arg_key>", 0),
    (  # one good call survives next to a broken one
        "<tool_call>good\n<arg_key>k</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
        "<tool_call>bad\n<arg_key>k</arg_key>\n</tool_call>",
        "tool call 2",
        1,
    ),
]


@pytest.mark.parametrize(("text", "fragment", "kept"), MALFORMED)
def test_malformed_calls_become_errors(text: str, fragment: str, kept: int) -> None:
    parsed = parse_tool_calls(text)
    assert not parsed.ok
    assert any(fragment in error for error in parsed.errors), parsed.errors
    assert len(parsed.calls) == kept


def test_parse_never_raises_on_random_tag_soup() -> None:
    import random

    rng = random.Random(0)
    pieces = [
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    ]
    pieces += ["f", "k", "1", " ", "\n", "{", "}"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        parsed = parse_tool_calls(text)
        assert isinstance(parsed.content, str)
        for call in parsed.calls:
            assert call.name and not any(ch.isspace() for ch in call.name)


def test_schema_string_parameters_stay_strings() -> None:
    text = render_tool_call(ToolCall("calculator", {"expression": "1234"}))
    assert parse_tool_calls(text).calls[0].arguments == {"expression": 1234}
    typed = parse_tool_calls(text, tools=[CALCULATOR_TOOL])
    assert typed.calls[0].arguments == {"expression": "1234"}


ROUND_TRIP = [
    ToolCall("calculator", {"expression": "4821*397"}),
    ToolCall("f", {"n": 3, "o": {"a": [1, 2]}, "flag": False, "s": "two words"}),
    ToolCall("noargs", {}),
]


@pytest.mark.parametrize("call", ROUND_TRIP)
def test_render_is_the_inverse_of_parse(call: ToolCall) -> None:
    text = render_tool_call(call)
    assert parse_tool_calls(text).calls == [call]
    assert parse_tool_calls(f"prose {text} more").content == "prose  more"


@pytest.mark.parametrize(
    "call",
    [
        ToolCall("", {}),
        ToolCall("a b", {}),
        ToolCall("f", {"": 1}),
        ToolCall("f", {"k": "</arg_value>"}),
    ],
)
def test_render_rejects_calls_the_format_cannot_carry(call: ToolCall) -> None:
    with pytest.raises(ValueError, match="ToolCall"):
        render_tool_call(call)


def test_calculator_demonstrations_parse_back_to_their_expression() -> None:
    for row in make_rows("calculator", 20, seed=3):
        turn = TASKS["calculator"].demonstration(row)[2]
        fn = turn["tool_calls"][0]["function"]
        parsed = parse_tool_calls(
            render_tool_call(ToolCall(fn["name"], fn["arguments"])), row["tools"]
        )
        assert parsed.calls == [
            ToolCall("calculator", {"expression": row["metadata"]["expression"]})
        ]
