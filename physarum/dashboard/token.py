"""The dashboard's access token, Jupyter-style: the printed URL carries it, the page then
keeps it in a cookie. Every route checks it; anything else gets 401.

Accepted from: the `token` query parameter, `Authorization: token T` (or `Bearer T`), or the
`physarum_token` cookie.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "physarum_token"


def new_token() -> str:
    return secrets.token_hex(24)


def presented(request: Request) -> str | None:
    """The token a request carries, wherever it carries it."""
    if "token" in request.query_params:
        return request.query_params["token"]
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("token", "bearer") and value:
        return value.strip()
    return request.cookies.get(COOKIE)


class TokenAuth:
    """ASGI middleware: 401 without the right token; a right one given in the URL is also
    set as a cookie, so the page's own fetches and a reload need not carry it."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = presented(request)
        if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
            response: Response = PlainTextResponse(
                "401: this dashboard needs its token; open the URL the job printed "
                "(http://HOST:PORT/?token=...)",
                status_code=401,
            )
            await response(scope, receive, send)
            return
        if request.query_params.get("token") == self.token:
            await self.app(scope, receive, _with_cookie(send, self.token))
            return
        await self.app(scope, receive, send)


def _with_cookie(send: Send, token: str) -> Send:
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {
                **message,
                "headers": [*message["headers"], (b"set-cookie", cookie.encode())],
            }
        await send(message)

    return wrapped
