"""What the server's routes share: the engine and what /model_info and /server_info report.

One `ServerState` per app, stored on `app.state.physarum` and handed to route handlers by the
`get_state` dependency (no module-level state).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from rollout.embedded.engine import EmbeddedEngine


@dataclass
class ServerState:
    engine: EmbeddedEngine
    model_path: str
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    no_auth: bool = False  # serve without a key: an explicit opt-out, loopback only (auth.py)
    server_args: dict[str, Any] = field(default_factory=dict)
    startup_time: float = field(default_factory=time.time)
    session_open: bool = False  # between /begin_weight_update and /end_weight_update
    weight_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    max_n: int = 64  # samples per prompt one request may ask for (/generate n, OpenAI n)
    max_body_bytes: int = 16 * 2**20  # request bodies above this answer 413 (body_limit.py)
    max_weight_body_bytes: int = 8 * 2**30  # the same for the weight-update routes


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the ServerState of the app serving this request."""
    return request.app.state.physarum


def error_response(message: str, status: int = 400) -> JSONResponse:
    """SGLang's error body for a refused request: {"error": {"message": ...}}."""
    return JSONResponse({"error": {"message": message}}, status_code=status)
