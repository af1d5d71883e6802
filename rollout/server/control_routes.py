"""Health, info and flow-control routes (SGLang 0.5.23 names and bodies).

GET /health, /health_generate (a 1-token greedy generation when idle), /model_info and
/server_info (+ the deprecated /get_model_info, /get_server_info, which log a warning);
POST /pause_generation {mode}, /continue_generation, /abort_request {rid, abort_all};
GET|POST /flush_cache (400 while requests run, as SGLang).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from rollout.embedded.engine import EngineBusyError
from rollout.server.bodies import AbortReq, ContinueGenerationReq, PauseGenerationReq
from rollout.server.state import ServerState, error_response, get_state
from rollout.types import GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

SERVER_VERSION = "physarum-embedded-0.1 (sglang-0.5.23-compatible)"
HEALTH_TIMEOUT = 20.0

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> Response:
    return Response(status_code=200 if await state.engine.health() else 503)


@router.get("/health_generate")
async def health_generate(state: ServerState = Depends(get_state)) -> Response:
    engine = state.engine
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


def _model_info(state: ServerState) -> dict[str, Any]:
    return {
        "model_path": state.model_path,
        "served_model_name": state.served_model_name or state.model_path,
        "tokenizer_path": state.tokenizer_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": str(state.engine.sched.version),
        "load_format": "auto",
        "reasoning_parser": None,
        "tool_call_parser": None,
        "disaggregation_mode": "null",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
    }


def _server_info(state: ServerState) -> dict[str, Any]:
    return {
        **state.server_args,
        "startup_time": state.startup_time,
        "internal_states": [state.engine.stats()],
        "version": SERVER_VERSION,
        "frontend": "python",
    }


@router.get("/model_info")
async def model_info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return _model_info(state)


@router.get("/get_model_info")
async def get_model_info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    logger.warning("Endpoint '/get_model_info' is deprecated; use '/model_info'")
    return _model_info(state)


@router.get("/server_info")
async def server_info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return _server_info(state)


@router.get("/get_server_info")
async def get_server_info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    logger.warning("Endpoint '/get_server_info' is deprecated; use '/server_info'")
    return _server_info(state)


@router.post("/pause_generation")
async def pause_generation(
    req: PauseGenerationReq, state: ServerState = Depends(get_state)
) -> JSONResponse:
    await state.engine.pause(req.mode)
    logger.info("pause_generation: mode %s", req.mode)
    return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})


@router.post("/continue_generation")
async def continue_generation(
    req: ContinueGenerationReq | None = None, state: ServerState = Depends(get_state)
) -> JSONResponse:
    await state.engine.resume()
    logger.info("continue_generation")
    return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})


@router.post("/abort_request")
async def abort_request(req: AbortReq, state: ServerState = Depends(get_state)) -> Response:
    if not req.abort_all and not req.rid:
        return error_response("rid: required unless abort_all is true")
    await state.engine.abort(None if req.abort_all else [req.rid])
    logger.info("abort_request: %s", "all" if req.abort_all else req.rid)
    return Response(status_code=200)


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(state: ServerState = Depends(get_state)) -> Response:
    try:
        await state.engine.flush_cache()
    except EngineBusyError as e:
        logger.warning("flush_cache refused: %s", e)
        return Response(content=f"{e}\n", status_code=400)
    logger.info("flush_cache: done")
    return Response(
        content="Cache flushed.\nPlease check backend logs for more details. (When there are "
        "running or waiting requests, the operation will not be performed.)\n",
        status_code=200,
    )
