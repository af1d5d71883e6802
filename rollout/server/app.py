"""The embedded engine's HTTP server: SGLang 0.5.23's routes and JSON (sglang_api.md B).

Routes: POST|PUT /generate (+ SSE streaming with cumulative output, as SGLang's default),
GET /health, /health_generate, /model_info, /server_info (+ deprecated /get_model_info,
/get_server_info), POST /begin_weight_update, /end_weight_update,
/update_weights_from_tensor (only inside a session, as SGLang), /update_weights_from_disk,
/update_weight_version, /pause_generation, /continue_generation, /abort_request,
GET|POST /flush_cache. With an API key every route but /health* needs
`Authorization: Bearer KEY` (SGLang's --api-key). Weight versions are integers here,
reported as decimal strings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout.embedded.engine import EmbeddedEngine, EngineBusyError
from rollout.embedded.sequence import Sequence
from rollout.server.control import AbortReq, ContinueGenerationReq, PauseGenerationReq
from rollout.server.protocol import ParsedGenerate, RequestError, format_item, parse_generate
from rollout.server.weights import add_weight_routes
from rollout.types import GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

SERVER_VERSION = "physarum-embedded-0.1 (sglang-0.5.23-compatible)"
HEALTH_TIMEOUT = 20.0
DISCONNECT_POLL = 1.0  # seconds between client-disconnect checks of a non-streamed /generate


@dataclass
class ServerState:
    """What the routes share: the engine and what /model_info and /server_info report."""

    engine: EmbeddedEngine
    model_path: str
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    server_args: dict[str, Any] = field(default_factory=dict)
    startup_time: float = field(default_factory=time.time)
    session_open: bool = False
    weight_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def error_response(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state.engine`."""
    app = FastAPI(title="physarum embedded engine")
    app.state.physarum = state
    _add_auth(app, state.api_key)
    _add_generate_routes(app, state)
    _add_info_routes(app, state)
    add_weight_routes(app, state)
    _add_flow_routes(app, state)
    return app


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    if not api_key:
        return

    @app.middleware("http")
    async def check_key(request: Request, call_next):  # type: ignore[no-untyped-def]
        path = request.url.path
        if request.method == "OPTIONS" or path.startswith(("/health", "/ready", "/metrics")):
            return await call_next(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token != api_key:
            logger.warning("refused %s %s: missing or wrong API key", request.method, path)
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)


# ---- /generate -----------------------------------------------------------------------------


def _text_fns(engine: EmbeddedEngine):  # type: ignore[no-untyped-def]
    tok = engine.tokenizer
    if tok is None:
        return None, (lambda ids: None), None
    return (
        lambda text: tok.encode(text),
        engine.decode_text,
        lambda t: tok.decode([t], skip_special_tokens=False),
    )


def _add_generate_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    tokenize, decode, token_text = _text_fns(engine)
    vocab = int(engine.model.config.vocab_size)

    def render(seq: Sequence, parsed: ParsedGenerate, upto: int | None = None) -> dict:
        return format_item(
            seq,
            upto=upto,
            current_version=engine.sched.version,
            decode=decode,
            text_in_logprobs=parsed.return_text_in_logprobs,
            token_text=token_text,
        )

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(f"request body: invalid JSON ({e})")
        try:
            parsed = parse_generate(body, tokenize, vocab)
        except RequestError as e:
            logger.info("/generate refused: %s", e)
            return JSONResponse(e.body(), status_code=e.status)
        if parsed.stream:
            return _stream(engine, parsed, render)
        try:
            seqs = [s for r in parsed.requests for s in engine.make_sequences(r)]
        except ValueError as e:
            logger.info("/generate refused: %s", e)
            return error_response(str(e))
        engine.submit(seqs)
        done = await _wait_or_abort_on_disconnect(engine, seqs, request)
        if done is None:
            return Response(status_code=499)  # nobody is listening any more
        items = [render(s, parsed) for s in done]
        logger.debug("/generate: %d outputs, rids %s", len(items), [s.rid for s in done][:4])
        return JSONResponse(items if parsed.batch else items[0])


async def _wait_or_abort_on_disconnect(
    engine: EmbeddedEngine, seqs: list[Sequence], request: Request
) -> list[Sequence] | None:
    """Await the sequences; abort them (and return None) if the client goes away, as SGLang."""
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


def _stream(engine: EmbeddedEngine, parsed: ParsedGenerate, render) -> Response:  # type: ignore[no-untyped-def]
    """SSE: one `data: {...}` per new token of any sample (cumulative), then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
    seqs: list[Sequence] = []

    def notifier(index: int):  # type: ignore[no-untyped-def]
        def on_update(seq: Sequence) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, len(seq.output_ids)))

        return on_update

    try:
        for req in parsed.requests:
            for seq in engine.make_sequences(req):
                seq.on_update = notifier(len(seqs))
                seqs.append(seq)
    except ValueError as e:
        return error_response(str(e))
    for i, seq in enumerate(seqs):
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
            if remaining:
                await engine.abort([s.rid for s in seqs if not s.finished])

    return StreamingResponse(body(), media_type="text/event-stream")


# ---- info ----------------------------------------------------------------------------------


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if await engine.health() else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if not await engine.health():
            return Response(status_code=503)
        stats = engine.stats()
        if engine.paused or stats["num_running"] or stats["num_waiting"]:
            return Response(status_code=200)  # busy: like SGLang, no extra generation
        probe = GenerateRequest([0], SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(engine.generate([probe]), HEALTH_TIMEOUT)
        except Exception as e:
            logger.error("health_generate failed: %s", e)
            return Response(status_code=503)
        return Response(status_code=200)

    def model_info() -> dict[str, Any]:
        config = engine.model.config
        return {
            "model_path": state.model_path,
            "served_model_name": state.served_model_name or state.model_path,
            "tokenizer_path": state.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(engine.sched.version),
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "glm4_moe",
            "architectures": [getattr(config, "architecture", "Glm4MoeForCausalLM")],
        }

    def server_info() -> dict[str, Any]:
        return {
            **state.server_args,
            "startup_time": state.startup_time,
            "internal_states": [engine.stats()],
            "version": SERVER_VERSION,
            "frontend": "python",
        }

    @app.get("/model_info")
    async def get_model_info() -> dict[str, Any]:
        return model_info()

    @app.get("/get_model_info")
    async def deprecated_model_info() -> dict[str, Any]:
        logger.warning("Endpoint '/get_model_info' is deprecated; use '/model_info'")
        return model_info()

    @app.get("/server_info")
    async def get_server_info() -> dict[str, Any]:
        return server_info()

    @app.get("/get_server_info")
    async def deprecated_server_info() -> dict[str, Any]:
        logger.warning("Endpoint '/get_server_info' is deprecated; use '/server_info'")
        return server_info()


# ---- flow control --------------------------------------------------------------------------


def _add_flow_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.post("/pause_generation")
    async def pause_generation(req: PauseGenerationReq) -> JSONResponse:
        await engine.pause(req.mode)
        logger.info("pause_generation: mode %s", req.mode)
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def continue_generation(req: ContinueGenerationReq | None = None) -> JSONResponse:
        await engine.resume()
        logger.info("continue_generation")
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @app.post("/abort_request")
    async def abort_request(req: AbortReq) -> Response:
        if not req.abort_all and not req.rid:
            return error_response("rid: required unless abort_all is true")
        await engine.abort(None if req.abort_all else [req.rid])
        logger.info("abort_request: %s", "all" if req.abort_all else req.rid)
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        try:
            await engine.flush_cache()
        except EngineBusyError as e:
            logger.warning("flush_cache refused: %s", e)
            return Response(content=f"{e}\n", status_code=400)
        logger.info("flush_cache: done")
        return Response(
            content="Cache flushed.\nPlease check backend logs for more details. (When there "
            "are running or waiting requests, the operation will not be performed.)\n",
            status_code=200,
        )
