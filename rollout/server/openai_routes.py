"""OpenAI-compatible routes on the engine server: GET /v1/models, POST /v1/chat/completions
and POST /v1/completions (streamed as server-sent events with `"stream": true`).

Requests and responses are the pydantic models of openai_protocol.py; refusals are OpenAI's
error shape (openai_errors.py). A non-streamed request whose client disconnects is aborted,
as /generate's are.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from rollout.server import openai_requests as rq
from rollout.server import openai_responses as rs
from rollout.server.generate import wait_or_abort_on_disconnect
from rollout.server.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
)
from rollout.server.openai_stream import stream_chat, stream_completion
from rollout.server.state import ServerState, get_state

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a bad parameter, named in error.param"},
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    404: {"model": ErrorBody, "description": "unknown model"},
}


def _sse_doc(chunk: type) -> dict[int | str, dict[str, Any]]:
    schema = {"type": "string", "description": f"data: <{chunk.__name__} JSON> ... data: [DONE]"}
    return {200: {"content": {"text/event-stream": {"schema": schema}}}, **_ERRORS}


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    card = ModelCard(id=rq.served_model(state), created=int(state.startup_time))
    return ModelList(data=[card])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, state: ServerState = Depends(get_state)) -> ModelCard:
    rq.check_model(state, model_id)
    return ModelCard(id=model_id, created=int(state.startup_time))


@router.post(
    "/chat/completions", response_model=ChatCompletion, responses=_sse_doc(ChatCompletionChunk)
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> Response:
    engine = state.engine
    rq.check_model(state, body.model)
    prompt = await asyncio.to_thread(rq.chat_prompt, engine, body)  # off the loop (/health)
    tools = rq.chat_tools(body) if body.tool_choice != "none" else None
    max_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    asked = body.max_completion_tokens or body.max_tokens
    params = rq.sampling_params(body, rq.max_new_tokens(engine, len(prompt), asked, "messages"))
    rq.check_n(params.n, state.max_n)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    rid, seqs = rq.make_sequences(engine, [prompt], params, "chatcmpl", max_param, top)
    options = dict(tools=tools, logprobs=body.logprobs, token_ids=body.return_token_ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_chat(
            engine, rid, body.model, prompt, seqs, include_usage=include_usage, **options
        )
    return await _answer(
        engine, seqs, request, lambda done: rs.chat_completion(
            engine, rid, body.model, prompt, done, **options)
    )  # fmt: skip


@router.post("/completions", response_model=Completion, responses=_sse_doc(Completion))
async def completions(
    body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> Response:
    engine = state.engine
    rq.check_model(state, body.model)
    prompts = await asyncio.to_thread(rq.completion_prompts, engine, body)
    longest = max(len(p) for p in prompts)
    params = rq.sampling_params(body, rq.max_new_tokens(engine, longest, body.max_tokens, "prompt"))
    rq.check_n(params.n * len(prompts), state.max_n)
    rid, seqs = rq.make_sequences(engine, prompts, params, "cmpl", "max_tokens", body.logprobs or 0)
    options = dict(logprobs=body.logprobs is not None, token_ids=body.return_token_ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_completion(
            engine, rid, body.model, prompts, seqs, include_usage=include_usage, **options
        )
    return await _answer(
        engine, seqs, request, lambda done: rs.completion(
            engine, rid, body.model, prompts, done, **options)
    )  # fmt: skip


async def _answer(engine: Any, seqs: list, request: Request, build: Any) -> Response:
    """Run the sequences to the end (aborted if the client goes away: 499) and answer with
    `build(finished sequences)` as JSON."""
    engine.submit(seqs)
    done = await wait_or_abort_on_disconnect(engine, seqs, request)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(build(done).model_dump())
