"""Refuse request bodies above a size limit with 413, before anything parses them.

A pure ASGI middleware: a declared Content-Length over the limit is refused at once; a body
without one (chunked) is counted as it arrives and refused when it passes the limit, so a
client cannot make the server buffer more than the limit either way. The weight-update
routes carry tensors and get their own, larger limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

from rollout.server.openai_errors import V1_PREFIX

WEIGHT_PREFIXES = ("/update_weights_from_tensor", "/update_weights_from_disk")


class BodyTooLarge(HTTPException):
    """Raised inside receive() when a streamed body passes the limit: an HTTPException, so
    the route's body parsing lets it through to the app's 413 answer."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(413, _message(size, limit))


class BodyLimit:
    """ASGI middleware: 413 for bodies above `limit` bytes (`weight_limit` on weight routes)."""

    def __init__(self, app: Any, limit: int, weight_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.weight_limit = weight_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.weight_limit if path.startswith(WEIGHT_PREFIXES) else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _refuse(send, path, int(length), limit)
            return
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(seen, limit)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, path, seen, limit)


def _message(size: int, limit: int) -> str:
    return f"request body of {size} bytes or more is above this server's limit of {limit} bytes"


async def _refuse(send: Any, path: str, size: int, limit: int) -> None:
    message = _message(size, limit)
    if path.startswith(V1_PREFIX):  # OpenAI's error shape on /v1
        body: dict = {"error": {"message": message, "type": "invalid_request_error",
                                "param": None, "code": "request_too_large"}}  # fmt: skip
    else:
        body = {"error": {"message": message}}
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(raw)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})
