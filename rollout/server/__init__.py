"""The embedded engine's HTTP server, speaking SGLang 0.5.23's API (FastAPI + uvicorn)."""

from rollout.server.app import build_app
from rollout.server.serve import ServerThread, free_port, load_engine, make_state, serve_engine
from rollout.server.state import ServerState

__all__ = [
    "ServerState",
    "ServerThread",
    "build_app",
    "free_port",
    "load_engine",
    "make_state",
    "serve_engine",
]
