"""OpenAI-shaped errors for the /v1 routes: `{"error": {"message", "type", "param", "code"}}`.

400 invalid_request_error for a bad parameter (named in `param`, e.g. `messages[1].content`),
401 for a missing or wrong API key, 404 for an unknown model, 503 when the engine is stopped.
FastAPI's own 422 validation errors on /v1 paths are rewritten into this shape (400, the
first offending field in `param`); other routes keep FastAPI's and SGLang's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from rollout.server.openai_protocol import ErrorBody, ErrorDetail

V1_PREFIX = "/v1/"
_UNION_LABEL = re.compile(r"^(str|int|float|bool|[a-z]+\[.*\]|[A-Z]\w*|function-.*)$")


class OpenAIError(Exception):
    """A refused /v1 request; `param` names the request field at fault."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.type, self.code = param, status, type, code

    def response(self) -> JSONResponse:
        detail = ErrorDetail(message=str(self), type=self.type, param=self.param, code=self.code)
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=self.status)


def unauthorized() -> JSONResponse:
    return OpenAIError("Incorrect API key provided", status=401, code="invalid_api_key").response()


def param_path(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif not _UNION_LABEL.match(str(part)):  # skip pydantic's union-branch labels
            out += f".{part}"
    return out or None  # type: ignore[return-value]


def install(app: FastAPI) -> None:
    """Register the handlers: OpenAIError anywhere, validation errors on /v1 paths."""

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not request.url.path.startswith(V1_PREFIX):
            return await request_validation_exception_handler(request, exc)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = param_path(first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            message, param = f"request body: invalid JSON ({first.get('msg')})", None
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return OpenAIError(message, param=param).response()
