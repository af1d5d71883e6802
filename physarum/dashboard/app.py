"""The dashboard app: the JSON API of `physarum.api` plus the page and its static files, all
behind the token. The page polls the API; charts are drawn by `static/dashboard.js` (SVG,
no library, no CDN), so it works with no internet."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response

from physarum.api import JobState, create_app
from physarum.dashboard.token import TokenAuth

STATIC = files("physarum.dashboard") / "static"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def create_dashboard_app(state: JobState, token: str) -> FastAPI:
    app = create_app(state)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC / "index.html").read_text().replace("{{NAME}}", _escape(state.name))

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        kind = next((t for ext, t in _TYPES.items() if name.endswith(ext)), None)
        resource = STATIC / name
        if kind is None or "/" in name or not resource.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return Response(resource.read_bytes(), media_type=kind)

    app.add_middleware(TokenAuth, token=token)
    return app


def _escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
