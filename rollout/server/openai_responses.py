"""Finished engine sequences -> OpenAI response objects (chat and text completions).

Tool calls: with tools in the request (and tool_choice not "none"), the GLM-4.x tool-call text
the model generated (`<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>`)
is parsed by envs.tool_calls into OpenAI `tool_calls` (arguments as JSON text) and the choice
finishes with "tool_calls"; the prose outside the calls is the message content. Malformed
calls are left in the content as text.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from envs.tool_calls import parse_tool_calls
from rollout.embedded.engine import EmbeddedEngine
from rollout.embedded.sequence import Sequence
from rollout.server.openai_protocol import (
    ChatChoice,
    ChatCompletion,
    ChatMessageOut,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FinishReason,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

TOOL_CALL_TAG = "<tool_call>"


def now() -> int:
    return int(time.time())


def token_text(engine: EmbeddedEngine, token: int) -> str:
    tok = engine.tokenizer
    return str(token) if tok is None else tok.decode([token], skip_special_tokens=False)


def output_text(engine: EmbeddedEngine, seq: Sequence) -> str:
    """The sample's text (special tokens skipped, a matched stop string cut off)."""
    decode = engine.decode_text if engine.tokenizer is not None else None
    return seq.to_output(decode).text or ""


TopTokens = list[list[tuple[int, float]]]  # per token: (id, logprob) of the most likely ones


def _tops(tops: TopTokens | None, n: int) -> TopTokens:
    return tops if tops else [[] for _ in range(n)]


def chat_logprobs(
    engine: EmbeddedEngine, ids: list[int], lps: list[float], tops: TopTokens | None = None
) -> ChoiceLogprobs:
    entries = []
    for t, lp, top in zip(ids, lps, _tops(tops, len(ids))):
        text = token_text(engine, t)
        alternatives = []
        for tid, tlp in top:
            ttext = token_text(engine, tid)
            alternatives.append(TopLogprob(token=ttext, logprob=tlp, bytes=list(ttext.encode())))
        entries.append(
            TokenLogprob(
                token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=alternatives
            )
        )
    return ChoiceLogprobs(content=entries)


def split_tool_calls(
    text: str, tools: list[dict[str, Any]] | None
) -> tuple[str | None, list[ToolCall]]:
    """(content, tool_calls) of a generated turn; no calls when `tools` is None."""
    if not tools or TOOL_CALL_TAG not in text:
        return text, []
    parsed = parse_tool_calls(text, tools)
    if not parsed.calls:
        return text, []
    calls = [
        ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            function=FunctionCall(
                name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)
            ),
        )
        for c in parsed.calls
    ]
    return parsed.content or None, calls


def finish_reason(seq: Sequence, has_calls: bool = False) -> FinishReason:
    if has_calls:
        return "tool_calls"
    return seq.finish_reason if seq.finish_reason in ("stop", "length") else "abort"


def usage(seqs: list[Sequence], prompts: list[list[int]]) -> Usage:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(s.output_ids) for s in seqs)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def chat_completion(
    engine: EmbeddedEngine,
    rid: str,
    model: str,
    prompt: list[int],
    seqs: list[Sequence],
    *,
    tools: list[dict[str, Any]] | None,
    logprobs: bool,
    token_ids: bool,
) -> ChatCompletion:
    choices = []
    for index, seq in enumerate(seqs):
        content, calls = split_tool_calls(output_text(engine, seq), tools)
        choices.append(
            ChatChoice(
                index=index,
                message=ChatMessageOut(content=content, tool_calls=calls or None),
                logprobs=chat_logprobs(engine, seq.output_ids, seq.logprobs, seq.top_logprobs)
                if logprobs
                else None,
                finish_reason=finish_reason(seq, bool(calls)),
                token_ids=list(seq.output_ids) if token_ids else None,
                weight_versions=list(seq.versions) if token_ids else None,
            )
        )
    return ChatCompletion(
        id=rid,
        created=now(),
        model=model,
        choices=choices,
        usage=usage(seqs, [prompt]),
        prompt_token_ids=list(prompt) if token_ids else None,
    )


def completion_logprobs(
    engine: EmbeddedEngine,
    ids: list[int],
    lps: list[float],
    start: int = 0,
    tops: TopTokens | None = None,
) -> CompletionLogprobs:
    tokens = [token_text(engine, t) for t in ids]
    offsets, pos = [], start
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top_dicts = None
    if tops:  # {token text: logprob}; ids that decode alike keep the most likely's logprob
        top_dicts = []
        for top in tops:
            d: dict[str, float] = {}
            for tid, tlp in top:
                d.setdefault(token_text(engine, tid), tlp)
            top_dicts.append(d)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=list(lps), top_logprobs=top_dicts, text_offset=offsets
    )


def completion(
    engine: EmbeddedEngine,
    rid: str,
    model: str,
    prompts: list[list[int]],
    seqs: list[Sequence],
    *,
    logprobs: bool,
    token_ids: bool,
) -> Completion:
    per_prompt = len(seqs) // len(prompts)
    choices = [
        CompletionChoice(
            index=index,
            text=output_text(engine, seq),
            logprobs=completion_logprobs(
                engine, seq.output_ids, seq.logprobs, tops=seq.top_logprobs
            )
            if logprobs
            else None,
            finish_reason=finish_reason(seq),
            token_ids=list(seq.output_ids) if token_ids else None,
            prompt_token_ids=list(prompts[index // per_prompt]) if token_ids else None,
            weight_versions=list(seq.versions) if token_ids else None,
        )
        for index, seq in enumerate(seqs)
    ]
    return Completion(
        id=rid, created=now(), model=model, choices=choices, usage=usage(seqs, prompts)
    )
