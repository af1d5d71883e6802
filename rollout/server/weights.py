"""Weight-update routes of the embedded engine's server (SGLang 0.5.23 semantics).

`/update_weights_from_tensor` must run inside a `/begin_weight_update` ...
`/end_weight_update` session, exactly as SGLang 0.5.21+ (else 400 with SGLang's message).
Tensors are HF-named; they are loaded between two decode steps, so running sequences continue
with the new weights. As in SGLang, `flush_cache=true` (the default) makes an update fail while
requests are running or queued; pass `flush_cache=false` for a partial rollout. A given
`weight_version` becomes the version of every token generated afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from rollout.embedded.weights import load_checkpoint, load_named_tensors
from rollout.server.bodies import (
    BeginWeightUpdateReq,
    EndWeightUpdateReq,
    UpdateWeightFromDiskReq,
    UpdateWeightsFromTensorReq,
    UpdateWeightVersionReq,
)
from rollout.server.state import ServerState, get_state
from rollout.server.tensor_payload import (
    PayloadError,
    decode_named_tensors,
    decode_weight_update_field,
)
from rollout.server.weight_checks import WeightCheckError, check_named_tensors

logger = logging.getLogger(__name__)

router = APIRouter()

SESSION_ERROR = (
    "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
)


def _result(success: bool, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"success": success, "message": message, **extra}, status_code=200 if success else 400
    )


def parse_version(value: str | None, field: str = "weight_version") -> int | None:
    """SGLang versions are strings; ours are ints. None stays None."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{field}: expected an integer string, got {value!r}") from None


def _checkpoint_fp8_block(path: Path) -> tuple[int, int] | None:
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    return tuple(block) if block else None


async def _prepare(state: ServerState, abort_all: bool, flush: bool) -> str | None:
    """Abort / check idleness before an update; an error message or None."""
    engine = state.engine
    if abort_all:
        await engine.abort(None)
    if flush and not engine.sched.idle:
        stats = engine.stats()
        return (
            "Failed to flush cache: requests are running or queued "
            f"({stats['num_running']} running, {stats['num_waiting']} waiting); "
            "pass flush_cache=false to update weights under running requests"
        )
    return None


@router.post("/begin_weight_update")
async def begin_weight_update(
    req: BeginWeightUpdateReq, state: ServerState = Depends(get_state)
) -> JSONResponse:
    state.session_open = True
    logger.info("begin_weight_update (selector %s)", req.selector)
    return _result(True, "Weight update session started.")


@router.post("/end_weight_update")
async def end_weight_update(
    req: EndWeightUpdateReq | None = None, state: ServerState = Depends(get_state)
) -> JSONResponse:
    if not state.session_open:
        return _result(False, "end_weight_update: no weight update session is open")
    state.session_open = False
    logger.info("end_weight_update")
    return _result(True, "Weight update session ended.")


def _decode_tensor_request(req: UpdateWeightsFromTensorReq) -> tuple[Any, Any, int | None]:
    """(named tensors or None, WeightUpdate or None, version); raises ValueError."""
    if req.load_format not in (None, "direct"):
        raise PayloadError(f"load_format: {req.load_format!r} is not supported here")
    version = parse_version(req.weight_version)
    if req.physarum_weight_update is not None:
        return None, decode_weight_update_field(req.physarum_weight_update), version
    if not req.serialized_named_tensors:
        raise PayloadError("serialized_named_tensors: expected at least one payload")
    return decode_named_tensors(req.serialized_named_tensors[0]), None, version


def _update_tensors(update: Any) -> list[tuple[str, Any]]:
    """The (name, tensor) pairs of a models.weight_update.WeightUpdate, every bucket."""
    from models.weight_update import iter_bucket_tensors

    try:
        return [pair for bucket in update.buckets for pair in iter_bucket_tensors(bucket)]
    except (RuntimeError, TypeError, ValueError) as e:  # names/shapes/dtypes that do not add up
        raise WeightCheckError(f"physarum_weight_update: inconsistent bucket ({e})") from None


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(
    req: UpdateWeightsFromTensorReq, state: ServerState = Depends(get_state)
) -> JSONResponse:
    if not state.session_open:
        return _result(False, SESSION_ERROR)
    engine = state.engine
    try:
        named, update, version = _decode_tensor_request(req)
        tensors = named if update is None else _update_tensors(update)
        # every tensor checked before any is loaded: a bad update leaves the old weights
        await asyncio.to_thread(check_named_tensors, engine.model, tensors)
    except WeightCheckError as e:
        logger.warning("update_weights_from_tensor refused: %s", e)
        return _result(False, f"Failed to update weights: {e}; the previous weights are kept")
    except ValueError as e:
        return _result(False, str(e))
    async with state.weight_lock:
        if (error := await _prepare(state, req.abort_all_requests, req.flush_cache)) is not None:
            return _result(False, error)
        try:
            if update is not None:
                await engine.update_weights(update)
                if version is not None:
                    await engine.set_weight_version(version)
            else:
                await load_named_tensors(engine, named, version)
        except (KeyError, ValueError, RuntimeError) as e:
            logger.error("update_weights_from_tensor failed: %s", e)
            return _result(False, f"Failed to update weights: {e}")
    logger.info("update_weights_from_tensor: version now %d", engine.sched.version)
    return _result(True, "Succeeded to update model weights.")


def _check_checkpoint(state: ServerState, path: Path) -> None:
    """Every tensor of the checkpoint at `path`, checked against the served model (a first
    pass over the files, so nothing is loaded unless all of it is good)."""
    from models.checkpoint import iter_checkpoint_tensors

    try:
        check_named_tensors(state.engine.model, iter_checkpoint_tensors(path), require_all=True)
    except WeightCheckError as e:
        raise WeightCheckError(f"{path}: {e}") from None
    except (OSError, RuntimeError) as e:  # unreadable or corrupt safetensors
        raise WeightCheckError(f"{path}: cannot read the weights ({e})") from None


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(
    req: UpdateWeightFromDiskReq, state: ServerState = Depends(get_state)
) -> JSONResponse:
    path = Path(req.model_path)
    try:
        version = parse_version(req.weight_version)
        if not (path / "config.json").is_file():
            raise ValueError(f"model_path: {str(path)!r} has no config.json")
        block = _checkpoint_fp8_block(path)
        await asyncio.to_thread(_check_checkpoint, state, path)
    except WeightCheckError as e:
        logger.warning("update_weights_from_disk refused: %s", e)
        message = f"Failed to load weights: {e}; the previous weights are kept"
        return _result(False, message, num_paused_requests=0)
    except (OSError, ValueError) as e:
        return _result(False, str(e), num_paused_requests=0)
    async with state.weight_lock:
        if (error := await _prepare(state, req.abort_all_requests, req.flush_cache)) is not None:
            return _result(False, error, num_paused_requests=0)
        try:
            await load_checkpoint(state.engine, path, version, fp8_block=block)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
            logger.error("update_weights_from_disk failed: %s", e)
            return _result(False, f"Failed to load weights: {e}", num_paused_requests=0)
    state.model_path = str(path)
    logger.info("update_weights_from_disk: %s, version %d", path, state.engine.sched.version)
    return _result(True, "Succeeded to update model weights.", num_paused_requests=0)


@router.post("/update_weight_version")
async def update_weight_version(
    req: UpdateWeightVersionReq, state: ServerState = Depends(get_state)
) -> JSONResponse:
    try:
        version = parse_version(req.new_version, "new_version")
    except ValueError as e:
        return _result(False, f"Failed to update weight version: {e}")
    if req.abort_all_requests:
        await state.engine.abort(None)
    await state.engine.set_weight_version(version)
    logger.info("update_weight_version: %d", version)
    return JSONResponse(
        {
            "success": True,
            "message": f"Weight version updated to {req.new_version}",
            "new_version": req.new_version,
        }
    )
