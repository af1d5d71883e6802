"""The GLM-style chat template and the chat functions: exact renderings, SFT masks, env turns."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from envs.tasks import tokenizer_corpus
from envs.tool_calls import ToolCall, parse_tool_calls, render_tool_call
from models.chat import (
    encode,
    observation_ids,
    prompt_ids,
    render_sft,
    render_text,
    user_turn_ids,
)
from models.tokenizer import build_toy_tokenizer

TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Exact arithmetic.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
CALL = {
    "type": "function",
    "function": {"name": "calculator", "arguments": {"expression": "4821*397"}},
}
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 4821*397?"},
    {"role": "assistant", "content": "Let me compute it.", "tool_calls": [CALL]},
    {"role": "tool", "name": "calculator", "content": "1913937"},
    {"role": "assistant", "content": "4821*397 = 1913937."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
TOOLS_HEADER = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to help with the user query.\n\n"
    "<tools>\n"
    '{"name": "calculator", "description": "Exact arithmetic.", "parameters": {"type": "object", '
    '"properties": {"expression": {"type": "string"}}, "required": ["expression"]}}\n'
    "</tools>\n\nCall a function in this format:\n<tool_call>{function-name}\n"
    "<arg_key>{arg-key}</arg_key>\n<arg_value>{arg-value}</arg_value>\n</tool_call>"
)
PROMPT = (
    "[gMASK]<sop>" + TOOLS_HEADER + "<|system|>\nYou are a careful assistant."
    "<|user|>\nWhat is 4821*397?<|assistant|>"
)
TURN_1 = (
    "\nLet me compute it.\n<tool_call>calculator\n<arg_key>expression</arg_key>\n"
    "<arg_value>4821*397</arg_value>\n</tool_call>"
)
OBSERVATION = "\n<tool_response>\n1913937\n</tool_response><|assistant|>"
TURN_2 = "\n4821*397 = 1913937."
USER_2 = "\nThanks!<|assistant|>"
TURN_3 = "\nYou're welcome."
RENDERING = (
    PROMPT + TURN_1 + "<|observation|>" + OBSERVATION + TURN_2 + "<|user|>" + USER_2 + TURN_3
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_toy_tokenizer(
        tmp_path_factory.mktemp("tok"), tokenizer_corpus(n_per_task=200, seed=0)
    )


def _runs(ids: list[int], mask: list[int], want: int, tok) -> list[str]:
    """Decoded text of each maximal run of tokens whose mask equals `want`."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m == want:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_multi_turn_rendering_with_tools_call_and_observation(tok) -> None:
    assert render_text(tok, CONVERSATION, [TOOL]) == RENDERING
    generation = render_text(tok, CONVERSATION[:2], [TOOL], add_generation_prompt=True)
    assert generation == PROMPT
    assert tok.apply_chat_template(CONVERSATION, tools=[TOOL], return_dict=False) == encode(
        tok, RENDERING
    )


def test_parallel_calls_and_results_share_one_observation_turn(tok) -> None:
    calls = [
        {"function": {"name": "calculator", "arguments": {"expression": "1+1"}}},
        {"function": {"name": "lookup", "arguments": {"ids": [1, 2], "exact": True}}},
    ]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "2"},
        {"role": "tool", "content": '{"found": 2}'},
    ]
    assert render_text(tok, messages, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\nq<|assistant|>"
        "\n<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>1+1</arg_value>\n"
        "</tool_call>"
        "\n<tool_call>lookup\n<arg_key>ids</arg_key>\n<arg_value>[1, 2]</arg_value>\n"
        "<arg_key>exact</arg_key>\n<arg_value>true</arg_value>\n</tool_call>"
        "<|observation|>\n<tool_response>\n2\n</tool_response>"
        '\n<tool_response>\n{"found": 2}\n</tool_response><|assistant|>'
    )


def test_think_block_only_when_the_message_has_reasoning(tok) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": " because "},
    ]
    assert (
        render_text(tok, messages)
        == "[gMASK]<sop><|user|>\nq<|assistant|>\n<think>because</think>\na"
    )
    assert "<think>" not in render_text(tok, messages[:1] + [{"role": "assistant", "content": "a"}])


def test_render_sft_masks_exactly_the_assistant_tokens(tok) -> None:
    prompt, response, mask = render_sft(tok, CONVERSATION, [TOOL])
    assert len(response) == len(mask)
    assert prompt + response == encode(tok, RENDERING + "<|endoftext|>")
    assert tok.decode(prompt) == PROMPT
    assert prompt == prompt_ids(tok, CONVERSATION[:2], [TOOL])
    assert _runs(response, mask, 1, tok) == [
        TURN_1 + "<|observation|>",
        TURN_2 + "<|user|>",
        TURN_3 + "<|endoftext|>",
    ]
    assert _runs(response, mask, 0, tok) == [OBSERVATION, USER_2]


def test_env_turns_continue_exactly_as_the_template_renders(tok) -> None:
    """A rollout that never re-tokenises: model turns + env insertions == the rendering."""
    stop = {
        t: tok.convert_tokens_to_ids(t) for t in ("<|observation|>", "<|user|>", "<|endoftext|>")
    }
    turn_1 = encode(tok, TURN_1) + [stop["<|observation|>"]]
    obs = observation_ids(tok, ["1913937"])
    turn_2 = encode(tok, TURN_2) + [stop["<|user|>"]]
    user = user_turn_ids(tok, "Thanks!")
    turn_3 = encode(tok, TURN_3) + [stop["<|endoftext|>"]]
    prompt = prompt_ids(tok, CONVERSATION[:2], [TOOL])
    assert prompt + turn_1 + obs == prompt_ids(tok, CONVERSATION[:4], [TOOL])
    assert prompt + turn_1 + obs + turn_2 + user == prompt_ids(tok, CONVERSATION[:6], [TOOL])
    sft_prompt, response, mask = render_sft(tok, CONVERSATION, [TOOL])
    rollout = turn_1 + obs + turn_2 + user + turn_3
    rollout_mask = [1] * len(turn_1) + [0] * len(obs) + [1] * len(turn_2) + [0] * len(user)
    assert (sft_prompt, response, mask) == (prompt, rollout, rollout_mask + [1] * len(turn_3))
    assert tok.decode(observation_ids(tok, ["7", "8"])) == (
        "\n<tool_response>\n7\n</tool_response>\n<tool_response>\n8\n</tool_response><|assistant|>"
    )
    assert observation_ids(tok, ["7"], include_role=True)[0] == stop["<|observation|>"]
    assert user_turn_ids(tok, "hi", include_role=True)[0] == stop["<|user|>"]


def test_single_turn_sft_appends_the_stop_token(tok) -> None:
    messages = [{"role": "user", "content": "37+58="}, {"role": "assistant", "content": "95"}]
    prompt, response, mask = render_sft(tok, messages)
    assert tok.decode(prompt) == "[gMASK]<sop><|user|>\n37+58=<|assistant|>"
    assert [tok.decode([t]) for t in response] == ["\n", "9", "5", "<|endoftext|>"]
    assert mask == [1, 1, 1, 1]


def test_openai_json_string_arguments_are_decoded(tok) -> None:
    as_string = {"function": {"name": "calculator", "arguments": '{"expression": "4821*397"}'}}
    messages = [CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [as_string]}]
    as_dict = [CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    assert render_text(tok, messages) == render_text(tok, as_dict)
    broken = {"function": {"name": "calculator", "arguments": "{oops"}}
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        render_text(tok, [CONVERSATION[1], {"role": "assistant", "tool_calls": [broken]}])


def test_bad_conversations_raise_readable_errors(tok) -> None:
    with pytest.raises(ValueError, match="no assistant turn"):
        render_sft(tok, CONVERSATION[:2])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        render_sft(tok, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[1\]: expected an object with a 'role'"):
        prompt_ids(tok, [CONVERSATION[1], {"content": "no role"}])
    with pytest.raises(TemplateError, match="unknown role narrator"):
        render_text(tok, [{"role": "narrator", "content": "x"}])
    with pytest.raises(ValueError, match="tool_results"):
        observation_ids(tok, [])


@pytest.mark.parametrize(
    "call",
    [
        ToolCall("calculator", {"expression": "4821*397"}),
        ToolCall("f", {"n": 3, "o": {"a": [1, 2]}, "flag": False, "s": "two words"}),
        ToolCall("noargs", {}),
    ],
)
def test_template_tool_calls_match_the_parser_format(tok, call: ToolCall) -> None:
    function = {"name": call.name, "arguments": call.arguments}
    message = {"role": "assistant", "content": "", "tool_calls": [{"function": function}]}
    text = render_text(tok, [{"role": "user", "content": "q"}, message])
    assert text == f"[gMASK]<sop><|user|>\nq<|assistant|>\n{render_tool_call(call)}"
    assert parse_tool_calls(text.split("<|assistant|>")[1]).calls == [call]


def test_chat_template_file_is_what_the_tokenizer_carries(tok) -> None:
    template = Path(__file__).parents[2] / "models" / "chat_template.jinja"
    assert tok.chat_template == template.read_text(encoding="utf-8")


def test_encode_equals_the_tokenizer_call_and_falls_back_when_truncating(tmp_path: Path) -> None:
    """encode's direct backend path gives the ids `tokenizer(text)` gives; with truncation
    set on the backend it goes through the tokenizer's call (which resets it) instead."""
    from models.chat import _plain_backend, encode

    tok = build_toy_tokenizer(tmp_path, tokenizer_corpus(n_per_task=200, seed=0))
    text = render_text(tok, CONVERSATION[:2], add_generation_prompt=True) + " 12+7=19 <|user|>"
    assert _plain_backend(tok) is not None
    assert encode(tok, text) == list(tok(text, add_special_tokens=False)["input_ids"])
    tok._tokenizer.enable_truncation(max_length=3)
    assert _plain_backend(tok) is None
    assert encode(tok, text) == list(tok(text, add_special_tokens=False)["input_ids"])


def test_decode_equals_the_tokenizer_decode(tok) -> None:
    """decode's direct backend path keeps special tokens as tokenizer.decode does."""
    from models.chat import decode

    ids = prompt_ids(tok, CONVERSATION[:2]) + encode(tok, " 12+7=19<|user|>")
    assert decode(tok, ids) == tok.decode(ids, skip_special_tokens=False)
    assert decode(tok, []) == tok.decode([], skip_special_tokens=False)
