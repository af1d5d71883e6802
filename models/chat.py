"""Chat conversations to token ids: prompts, SFT sequences with loss masks, and env turns.

Pure functions over a Hugging Face tokenizer and its chat template (ours or a real GLM one);
plain `list[int]` in and out. Everything is derived from the template's own renderings, so
the ids here are exactly what `tokenizer.apply_chat_template` produces:

* `prompt_ids`       the prompt a policy generates from (generation prompt appended);
* `render_sft`       (prompt_ids, response_ids, loss_mask) of a finished conversation, the
                     mask 1 exactly on what the assistant itself generated, including the
                     stop token that ends each of its turns;
* `observation_ids` / `user_turn_ids`
                     what an environment appends after the model stopped, up to and including
                     the next generation prompt, so a multi-turn rollout that never
                     re-tokenises still equals the template's rendering of the conversation.

GLM turns carry no closing token: the model ends a turn by generating `<|observation|>` (a
tool call follows), `<|user|>` or `<|endoftext|>`. That generated token belongs to the
assistant's turn (mask 1); the final turn gets `<|endoftext|>` appended when the template
renders none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from models.tokenizer import stop_token_ids

Message = Mapping[str, Any]
Tools = Sequence[Mapping[str, Any]] | None


def _normalise(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Copies of the messages with OpenAI-style JSON-string tool arguments decoded."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{i}]: expected an object with a 'role', got {message!r}")
        copy = dict(message)
        calls = []
        for j, call in enumerate(copy.get("tool_calls") or ()):
            call = dict(call)
            fn = dict(call.get("function", call))
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError as err:
                    where = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            calls.append({**call, "function": fn} if "function" in call else fn)
        if calls:
            copy["tool_calls"] = calls
        out.append(copy)
    return out


def render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    tools: Tools = None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's rendering of `messages` as a string."""
    return tokenizer.apply_chat_template(
        _normalise(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of already-templated text (no extra special tokens added).

    A fast tokenizer's Rust backend encodes directly when that gives what `tokenizer(text)`
    gives (no truncation or padding set on it, special tokens split as the wrapper would):
    the wrapper's `__call__` goes through `encode_batch`, whose thread pool wakes (and
    spins) for a single short prompt, plus its own argument handling, on every group."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """`tokenizer.decode(ids, skip_special_tokens=False)`, on a fast tokenizer's backend
    directly when that is what the wrapper would do (its own `_decode`, no clean-up of
    spaces): the wrapper's argument conversion costs ~3x the decode of a short response."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(backend, Tokenizer)
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
        and not tokenizer.clean_up_tokenization_spaces
    ):
        return backend.decode(list(ids), skip_special_tokens=False)
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` behind a fast tokenizer when encoding with it directly
    equals `tokenizer(text, add_special_tokens=False)`; None otherwise."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer) or backend.truncation or backend.padding:
        return None
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend if backend.encode_special_tokens == split else None


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], tools: Tools = None
) -> list[int]:
    """Ids of `messages` rendered with the generation prompt (`<|assistant|>` for GLM)."""
    return encode(tokenizer, render_text(tokenizer, messages, tools, add_generation_prompt=True))


def _stop_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [t for t in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)) if t]


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Tools, full: str
) -> list[tuple[int, int]]:
    """Character spans of `full` the assistant generates, each with its closing stop token."""
    stops = _stop_texts(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("messages[0]: an assistant turn needs a prompt before it")
        before = render_text(tokenizer, messages[:i], tools, add_generation_prompt=True)
        after = render_text(tokenizer, messages[: i + 1], tools)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                f"messages[{i}]: the chat template does not render this conversation "
                "incrementally (an earlier rendering is not a prefix of a later one)"
            )
        end = len(after)
        stop = next((s for s in stops if full.startswith(s, end)), None)
        spans.append((len(before), end + len(stop) if stop else end))
    return spans


def render_sft(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], tools: Tools = None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, response_ids, loss_mask) of a finished conversation.

    prompt_ids    everything up to and including the first assistant turn's generation prompt
    response_ids  every later token (assistant turns, observations, later user turns)
    loss_mask     len(response_ids); 1 exactly on assistant-generated tokens: its content, its
                  tool calls and the stop token ending its turn (`<|observation|>`,
                  `<|user|>`, or the `<|endoftext|>` appended after a final assistant turn)

    prompt_ids + response_ids equals the template's full rendering (+ that final stop token).
    ValueError when there is no assistant turn to train on.
    """
    msgs = _normalise(messages)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("messages: no assistant turn to train on")
    text = render_text(tokenizer, msgs, tools)
    spans = _assistant_spans(tokenizer, msgs, tools, text)
    last_start, last_end = spans[-1]
    if last_end == len(text) and not any(s in text[last_start:] for s in _stop_texts(tokenizer)):
        text += tokenizer.eos_token
        spans[-1] = (last_start, len(text))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    mask = [0] * len(ids)
    for k, (lo, hi) in enumerate(offsets):
        for start, end in spans:
            if start <= lo and hi <= end and hi > lo:
                mask[k] = 1
            elif lo < end and hi > start and hi > lo:
                raise ValueError(
                    f"token {k} ({lo}-{hi}) straddles an assistant turn boundary ({start}-{end}); "
                    "the tokenizer merges text across turns"
                )
    first = spans[0][0]
    cut = next(k for k, (lo, hi) in enumerate(offsets) if lo >= first and hi > lo)
    return ids[:cut], ids[cut:], mask[cut:]


def _continuation(
    tokenizer: PreTrainedTokenizerBase,
    history: list[dict[str, Any]],
    new: list[dict[str, Any]],
    include_role: bool,
) -> list[int]:
    """Ids the template adds after `history` for the `new` turns + the generation prompt."""
    before = render_text(tokenizer, history)
    after = render_text(tokenizer, history + new, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template does not render this conversation incrementally")
    suffix = after[len(before) :]
    role = next((s for s in _stop_texts(tokenizer) if suffix.startswith(s)), None)
    if role and not include_role:
        suffix = suffix[len(role) :]
    return encode(tokenizer, suffix)


def observation_ids(
    tokenizer: PreTrainedTokenizerBase, tool_results: Sequence[str], *, include_role: bool = False
) -> list[int]:
    """Ids an environment appends after a model turn that ended with `<|observation|>`.

    The tool results as one observation turn, then the next generation prompt. The model
    generated `<|observation|>` itself, so it is left out unless `include_role` (use that when
    the turn ended on another stop token, e.g. max tokens reached right after a tool call).
    """
    if not tool_results:
        raise ValueError("tool_results: expected at least one tool result")
    call = {"function": {"name": "f", "arguments": {}}}
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    new = [{"role": "tool", "content": str(r)} for r in tool_results]
    return _continuation(tokenizer, history, new, include_role)


def user_turn_ids(
    tokenizer: PreTrainedTokenizerBase, content: str, *, include_role: bool = False
) -> list[int]:
    """Ids an environment appends for a follow-up user turn after the model stopped.

    The user turn then the next generation prompt; the `<|user|>` role token is left out
    (the model generated it as its stop token) unless `include_role`.
    """
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    return _continuation(tokenizer, history, [{"role": "user", "content": content}], include_role)
