"""The embedded engine's HTTP server: SGLang 0.5.23's routes and JSON (sglang_api.md B).

Routes (one module each): generate.py (POST|PUT /generate, SSE streaming), control_routes.py
(health, info, pause/continue/abort, flush_cache), weights.py (weight-update session and
updates from tensors or disk, weight version). Every route but /health*, /ready and
/metrics needs `Authorization: Bearer KEY` (SGLang's --api-key; 401 {"error": "Unauthorized"}
otherwise) unless the state opts out with `no_auth`, which auth.py allows on loopback only.
Weight versions are integers here, reported as decimal strings. /v1/* are the
OpenAI-compatible routes (openai_routes.py), guarded by the same key but refused in OpenAI's
error shape.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rollout.server import control_routes, generate, openai_errors, openai_routes, weights
from rollout.server.auth import EngineAuthError
from rollout.server.body_limit import BodyLimit
from rollout.server.state import ServerState

logger = logging.getLogger(__name__)

OPEN_PREFIXES = ("/health", "/ready", "/metrics")  # probes never need the key (as SGLang)


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state.engine`."""
    app = FastAPI(title="physarum embedded engine")
    if not state.api_key and not state.no_auth:
        raise EngineAuthError(
            "build_app: the state has no api_key and did not opt out (no_auth=True, loopback "
            "only); make it with make_state(..., api_key=KEY)"
        )
    app.state.physarum = state
    if state.api_key:
        _add_auth(app, state.api_key)
    openai_errors.install(app)
    app.add_middleware(
        BodyLimit, limit=state.max_body_bytes, weight_limit=state.max_weight_body_bytes
    )
    for module in (generate, control_routes, weights, openai_routes):
        app.include_router(module.router)
    return app


def _add_auth(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def check_key(request: Request, call_next):  # type: ignore[no-untyped-def]
        path = request.url.path
        if request.method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
            return await call_next(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, api_key.encode()):
            logger.warning("refused %s %s: missing or wrong API key", request.method, path)
            if path.startswith(openai_errors.V1_PREFIX):
                return openai_errors.unauthorized()
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)
