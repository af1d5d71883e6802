"""Server-sent events for `"stream": true` on /v1/chat/completions and /v1/completions.

Each new token of any choice yields a chunk with the text added since the last one (OpenAI's
deltas, not SGLang's cumulative text), then a final chunk per choice with its finish_reason,
an optional usage chunk (`stream_options.include_usage`), and `data: [DONE]`. Text that could
still turn into a stop string or a tool call (`<tool_call>`) is held back until it is decided;
with tools, the calls go out as one `tool_calls` delta once the choice finished. A client that
disconnects mid-stream has its sequences aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from rollout.embedded.engine import EmbeddedEngine
from rollout.embedded.sequence import Sequence
from rollout.server.openai_protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    ToolCallDelta,
)
from rollout.server.openai_responses import (
    TOOL_CALL_TAG,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    now,
    output_text,
    split_tool_calls,
    usage,
)


def safe_prefix(text: str, holds: list[str]) -> str:
    """`text` without what may still become one of `holds` (or an incomplete character)."""
    text = text.rstrip("\ufffd")
    for h in holds:
        cut = text.find(h)
        if cut >= 0:
            text = text[:cut]
    for h in holds:
        for k in range(min(len(h) - 1, len(text)), 0, -1):
            if text.endswith(h[:k]):
                text = text[:-k]
                break
    return text


@dataclass
class _Choice:
    """What one choice has sent so far."""

    text: str = ""
    tokens: int = 0
    started: bool = False

    def delta(self, text: str) -> str:
        if not text.startswith(self.text):  # earlier text decoded differently: wait
            return ""
        out, self.text = text[len(self.text) :], text
        return out


async def _progress(
    engine: EmbeddedEngine, seqs: list[Sequence]
) -> AsyncIterator[tuple[int, bool]]:
    """(choice index, finished) each time a sequence has new tokens or finished."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()
    for i, seq in enumerate(seqs):
        seq.on_update = lambda _s, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, False))
        seq.done.add_done_callback(  # type: ignore[union-attr]
            lambda _f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, True))
        )
    engine.submit(seqs)
    remaining = len(seqs)
    try:
        while remaining:
            index, finished = await events.get()
            remaining -= finished
            yield index, finished
    finally:
        if remaining:  # the client went away mid-stream
            await engine.abort([s.rid for s in seqs if not s.finished])


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def stream_chat(
    engine: EmbeddedEngine,
    rid: str,
    model: str,
    prompt: list[int],
    seqs: list[Sequence],
    *,
    tools: list[dict[str, Any]] | None,
    logprobs: bool,
    token_ids: bool,
    include_usage: bool,
) -> StreamingResponse:
    created = now()
    holds = [s for s in seqs[0].params.stop] + ([TOOL_CALL_TAG] if tools else [])
    state = [_Choice() for _ in seqs]

    def chunk(choice: ChatChunkChoice, **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice], **extra)

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        first = True
        async for index, finished in _progress(engine, seqs):
            seq, sent = seqs[index], state[index]
            new_ids, new_lps, new_tops = _advance(seq, sent, finished)
            text, calls = _chat_text(engine, seq, sent.tokens, finished, holds, tools)
            delta = ChatDelta(content=sent.delta(text))
            if not sent.started:
                delta.role, sent.started = "assistant", True
            choice = ChatChunkChoice(
                index=index,
                delta=delta,
                logprobs=chat_logprobs(engine, new_ids, new_lps, new_tops) if logprobs else None,
                token_ids=list(new_ids) if token_ids else None,
            )
            ids = {"prompt_token_ids": list(prompt)} if token_ids and first else {}
            first = False
            yield chunk(choice, **ids)
            if finished:
                for final in _chat_endings(index, seq, calls):
                    yield chunk(final)
        if include_usage:
            yield ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=usage(seqs, [prompt])
            )

    return _sse(chunks())


def _advance(seq: Sequence, sent: _Choice, finished: bool) -> tuple[list, list, list]:
    """(token ids, logprobs, top logprobs) not sent yet: one token per update while running
    (so each chunk carries one token's delta), all of them once finished; marks them sent."""
    upto = len(seq.output_ids) if finished else min(len(seq.output_ids), sent.tokens + 1)
    new_ids, new_lps = seq.output_ids[sent.tokens : upto], seq.logprobs[sent.tokens : upto]
    new_tops = seq.top_logprobs[sent.tokens : upto]
    sent.tokens = upto
    return new_ids, new_lps, new_tops


def _chat_text(
    engine: EmbeddedEngine,
    seq: Sequence,
    upto: int,
    finished: bool,
    holds: list[str],
    tools: list[dict[str, Any]] | None,
) -> tuple[str, list]:
    """(text so far, tool calls): once finished, the final text (with tool calls, what
    precedes the first one) and its calls; before, the decided prefix of the first `upto`
    tokens and no calls."""
    if not finished:
        return safe_prefix(engine.decode_text(seq.output_ids[:upto]) or "", holds), []
    text = output_text(engine, seq)
    _, calls = split_tool_calls(text, tools)
    return (text[: text.find(TOOL_CALL_TAG)] if calls else text), calls


def _chat_endings(index: int, seq: Sequence, calls: list) -> list[ChatChunkChoice]:
    """A finished choice's last chunks: its tool calls as one delta (if any), then its
    finish_reason."""
    out = []
    if calls:
        deltas = [
            ToolCallDelta(index=j, id=c.id, type="function", function=c.function)
            for j, c in enumerate(calls)
        ]
        out.append(ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas)))
    reason = finish_reason(seq, bool(calls))
    out.append(ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason))
    return out


def stream_completion(
    engine: EmbeddedEngine,
    rid: str,
    model: str,
    prompts: list[list[int]],
    seqs: list[Sequence],
    *,
    logprobs: bool,
    token_ids: bool,
    include_usage: bool,
) -> StreamingResponse:
    created = now()
    holds = list(seqs[0].params.stop)
    state = [_Choice() for _ in seqs]
    decode: Callable[[list[int]], str] = lambda ids: engine.decode_text(ids) or ""  # noqa: E731

    async def chunks() -> AsyncIterator[Completion]:
        async for index, finished in _progress(engine, seqs):
            seq, sent = seqs[index], state[index]
            new_ids, new_lps, new_tops = _advance(seq, sent, finished)
            if finished:
                text = output_text(engine, seq)
            else:
                text = safe_prefix(decode(seq.output_ids[: sent.tokens]), holds)
            offset = len(sent.text)
            choice = CompletionChoice(
                index=index,
                text=sent.delta(text),
                logprobs=completion_logprobs(engine, new_ids, new_lps, offset, new_tops)
                if logprobs
                else None,
                finish_reason=finish_reason(seq) if finished else None,
                token_ids=list(new_ids) if token_ids else None,
            )
            yield Completion(id=rid, created=created, model=model, choices=[choice])
        if include_usage:
            yield Completion(
                id=rid, created=created, model=model, choices=[], usage=usage(seqs, prompts)
            )

    return _sse(chunks())
