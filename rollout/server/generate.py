"""POST|PUT /generate: SGLang's generation route on the embedded engine.

Non-streamed requests answer one JSON object (a list for batch input or n > 1) once every
sample finished; if the client disconnects first, its sequences are aborted (as SGLang).
`"stream": true` answers Server-Sent Events, one `data: {...}` per new token of any sample
with the *cumulative* text/output_ids (SGLang's default), the final one carrying
`finish_reason`, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout.embedded.engine import EmbeddedEngine
from rollout.embedded.sequence import Sequence
from rollout.routing_wire import RoutingLayout
from rollout.server.generate_models import GenerateReqInput, GenerateResponse
from rollout.server.protocol import ParsedGenerate, RequestError, format_item, parse_generate
from rollout.server.state import ServerState, error_response, get_state

logger = logging.getLogger(__name__)

DISCONNECT_POLL = 1.0  # seconds between client-disconnect checks of a non-streamed /generate

router = APIRouter()

Render = Callable[[Sequence, ParsedGenerate, "int | None"], dict[str, Any]]


def _renderer(engine: EmbeddedEngine) -> Render:
    tok = engine.tokenizer
    config = getattr(engine.model, "config", None)
    routing = RoutingLayout.of(config) if hasattr(config, "n_routed_experts") else None

    def decode(ids: list[int]) -> str | None:
        return engine.decode_text(ids)

    def token_text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def render(seq: Sequence, parsed: ParsedGenerate, upto: int | None = None) -> dict[str, Any]:
        return format_item(
            seq,
            upto=upto,
            current_version=engine.sched.version,
            decode=decode,
            text_in_logprobs=parsed.return_text_in_logprobs,
            token_text=token_text if tok is not None else None,
            routing=routing,
        )

    return render


_GENERATE_DOC: dict[str, Any] = dict(
    response_model=GenerateResponse | list[GenerateResponse],
    responses={200: {"content": {"text/event-stream": {}}}},
)


@router.post("/generate", operation_id="generate", **_GENERATE_DOC)
@router.put("/generate", operation_id="generate_put", **_GENERATE_DOC)
async def generate(
    req: GenerateReqInput, request: Request, state: ServerState = Depends(get_state)
) -> Response:
    engine = state.engine
    body = req.as_body()
    tok = engine.tokenizer
    tokenize = (lambda text: tok.encode(text)) if tok is not None else None
    vocab = int(engine.model.config.vocab_size)
    try:  # in a thread: tokenizing a big text must not stall the loop (/health, other requests)
        parsed = await asyncio.to_thread(parse_generate, body, tokenize, vocab, max_n=state.max_n)
        seqs = [s for r in parsed.requests for s in engine.make_sequences(r)]
    except RequestError as e:
        logger.info("/generate refused: %s", e)
        return JSONResponse(e.body(), status_code=e.status)
    except ValueError as e:  # context length, stop strings without a tokenizer, ...
        logger.info("/generate refused: %s", e)
        return error_response(str(e))
    render = _renderer(engine)
    if parsed.stream:
        return _stream(engine, parsed, seqs, render)
    engine.submit(seqs)
    done = await wait_or_abort_on_disconnect(engine, seqs, request)
    if done is None:
        return Response(status_code=499)  # nobody is listening any more
    items = [render(s, parsed, None) for s in done]
    logger.debug("/generate: %d outputs, rids %s", len(items), [s.rid for s in done][:4])
    return JSONResponse(items if parsed.batch else items[0])


async def wait_or_abort_on_disconnect(
    engine: EmbeddedEngine, seqs: list[Sequence], request: Request
) -> list[Sequence] | None:
    """Await the sequences; abort them (and return None) if the client goes away."""
    waiter = asyncio.ensure_future(engine.wait(seqs))
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL)
        if done:
            return waiter.result()
        if await request.is_disconnected():
            logger.info("/generate: client disconnected; aborting %d sequences", len(seqs))
            await engine.abort([s.rid for s in seqs if not s.finished])
            await waiter
            return None


def _stream(
    engine: EmbeddedEngine, parsed: ParsedGenerate, seqs: list[Sequence], render: Render
) -> Response:
    """SSE: one event per new token of any sample (cumulative), then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()

    def notifier(index: int) -> Callable[[Sequence], None]:
        def on_update(seq: Sequence) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, (index, len(seq.output_ids)))

        return on_update

    for i, seq in enumerate(seqs):
        seq.on_update = notifier(i)
        seq.done.add_done_callback(
            lambda _f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None))
        )
    engine.submit(seqs)

    async def body() -> AsyncIterator[bytes]:
        remaining = len(seqs)
        try:
            while remaining:
                index, upto = await events.get()
                if upto is None:
                    remaining -= 1
                item = render(seqs[index], parsed, upto)
                if parsed.batch:
                    item["index"] = index
                yield b"data: " + json.dumps(item).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            if remaining:  # the client went away mid-stream
                await engine.abort([s.rid for s in seqs if not s.finished])

    return StreamingResponse(body(), media_type="text/event-stream")
