"""The rollout worker's OpenAI endpoint for agents: one engine, one API key per episode.

`AgentServer` serves the worker's own `EmbeddedEngine` over HTTP (uvicorn in a thread, on
127.0.0.1 or the node IP, a free port) with exactly two routes, `GET /v1/models` and
`POST /v1/chat/completions`: the route code of `rollout.server.openai_routes`, unchanged.
Each agent episode gets an `EpisodeRecorder` whose random key is the API key of its client,
so the key says which episode a call belongs to.

`CaptureMiddleware` sits in front of the routes. For a chat completion it:

* refuses a call without a live episode key (401), `stream: true` or `n > 1` (400, OpenAI's
  error shape naming the parameter): those answers could not be captured token for token;
* rewrites the request so the answer carries what training needs (`return_token_ids`,
  `logprobs`) and samples as the job does: `temperature`, `top_p`, `top_k` and `seed` are
  the episode's (training needs the engine's logprobs under the trainer's temperature), the
  agent's `max_tokens` is capped at the episode's and at the room left in the context (the
  answer is cut, finish_reason "length", instead of refused), any `model` name means the
  policy;
* records the answer (`rollout.agent_capture.CapturedCall`: prompt ids, sampled ids,
  logprobs, weight versions) BEFORE the agent reads it, so a finished agent's calls are all
  recorded.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError

from rollout.agent_capture import CapturedCall
from rollout.server import ServerThread, make_state, openai_errors, openai_routes
from rollout.server.openai_errors import OpenAIError
from rollout.server.openai_protocol import ChatCompletionRequest
from rollout.server.openai_requests import chat_prompt
from rollout.types import SamplingParams

SERVED_MODEL = "policy"
CHAT_PATH = "/v1/chat/completions"
_OPEN_PATHS = ("/v1/models", CHAT_PATH)


@dataclass
class RecordedCall:
    """One captured call and the assistant message the agent was given."""

    call: CapturedCall
    content: str
    tool_calls: list[dict[str, Any]]  # [{name, arguments (JSON text)}]


@dataclass
class EpisodeRecorder:
    """The calls of one agent episode (appended from the server thread)."""

    key: str
    sampling: SamplingParams
    calls: list[RecordedCall] = field(default_factory=list)
    open: bool = True

    def request_seed(self) -> int | None:
        """A seed per call when the episode is seeded (eval), else None (fresh draws)."""
        base = self.sampling.sampling_seed
        return None if base is None else (base + 7919 * len(self.calls)) % (1 << 62)


class CaptureMiddleware:
    """ASGI middleware: rewrites and records /v1/chat/completions (see module doc)."""

    def __init__(self, app: Any, *, server: AgentServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path not in _OPEN_PATHS and not path.startswith("/v1/models/"):
            error = OpenAIError(f"{path}: not served to agents", status=404, code="not_found")
            return await error.response()(scope, receive, send)
        recorder = self.server.recorder(_bearer(scope))
        if recorder is None:
            return await openai_errors.unauthorized()(scope, receive, send)
        if path != CHAT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = _rewrite(await _read_body(receive), recorder, self.server.room)
        except OpenAIError as error:
            return await error.response()(scope, receive, send)
        await self._forward(scope, body, recorder, receive, send)

    async def _forward(
        self, scope: dict, body: bytes, recorder: EpisodeRecorder, client: Any, send: Any
    ) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        given = False

        async def receive() -> dict:
            nonlocal given
            if given:  # the body was read: what comes next is the client going away
                return await client()
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        messages: list[dict] = []

        async def collect(message: dict) -> None:
            messages.append(message)

        await self.app({**scope, "headers": headers}, receive, collect)
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        if start is not None and start["status"] == 200:
            answer = b"".join(
                m.get("body", b"") for m in messages if m["type"] == "http.response.body"
            )
            self.server.record(recorder, json.loads(answer))
        for message in messages:
            await send(message)


def _bearer(scope: dict) -> str:
    for key, value in scope["headers"]:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise OpenAIError("request body: the client went away", param=None)
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _rewrite(raw: bytes, recorder: EpisodeRecorder, room: Any) -> bytes:
    """The request as the engine should serve it for this episode (see module doc)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise OpenAIError(f"request body: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OpenAIError("request body: expected a JSON object")
    if data.get("stream"):
        raise OpenAIError(
            "stream: agent episodes are captured from whole answers; send stream=false",
            param="stream",
        )
    if data.get("n") not in (None, 1):
        raise OpenAIError("n: an agent episode samples one choice per call", param="n")
    s = recorder.sampling
    asked = data.pop("max_completion_tokens", None) or data.get("max_tokens")
    cap = min(int(asked), s.max_new_tokens) if asked else s.max_new_tokens
    left = room(data)  # near the end of the context the answer is cut ("length"), not refused
    data.update(
        model=SERVED_MODEL,
        max_tokens=min(cap, left) if left is not None and left >= 1 else cap,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=recorder.request_seed(),
        logprobs=True,
        top_logprobs=None,
        return_token_ids=True,
    )
    return json.dumps(data).encode()


class AgentServer:
    """The engine behind an OpenAI endpoint, one recorder per episode (see module doc)."""

    def __init__(self, engine: Any, *, host: str = "127.0.0.1") -> None:
        # episode keys guard the routes (CaptureMiddleware); this key is never handed out
        state = make_state(engine, SERVED_MODEL, api_key=secrets.token_hex(16), host=host)
        app = FastAPI(title="physarum agent endpoint")
        app.state.physarum = state
        openai_errors.install(app)
        app.include_router(openai_routes.router)
        self._engine = engine
        self._recorders: dict[str, EpisodeRecorder] = {}
        self._lock = threading.Lock()
        self._thread = ServerThread(state, host, app=CaptureMiddleware(app, server=self))

    @property
    def base_url(self) -> str:
        return f"{self._thread.url}/v1"

    def start(self) -> AgentServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()

    @contextmanager
    def episode(self, sampling: SamplingParams) -> Iterator[EpisodeRecorder]:
        """A recorder with a fresh key, closed (later calls refused, 401) on exit."""
        recorder = EpisodeRecorder(key=f"ep-{secrets.token_hex(16)}", sampling=sampling)
        with self._lock:
            self._recorders[recorder.key] = recorder
        try:
            yield recorder
        finally:
            with self._lock:
                recorder.open = False
                self._recorders.pop(recorder.key, None)

    def room(self, data: dict[str, Any]) -> int | None:
        """Context positions left after this request's prompt (rendered by the route's own
        code), or None when the request is invalid (the route then refuses it)."""
        try:
            request = ChatCompletionRequest.model_validate(data)
            return self._engine.sched.context_len - len(chat_prompt(self._engine, request))
        except (OpenAIError, ValidationError, ValueError):
            return None

    def recorder(self, key: str) -> EpisodeRecorder | None:
        with self._lock:
            return self._recorders.get(key)

    def record(self, recorder: EpisodeRecorder, body: dict[str, Any]) -> None:
        call = CapturedCall.from_chat_completion(body)
        message = body["choices"][0]["message"]
        tools = [c["function"] for c in message.get("tool_calls") or ()]
        with self._lock:
            if recorder.open:  # an answer that lands after the episode ended is not its own
                recorder.calls.append(RecordedCall(call, message.get("content") or "", tools))

    def calls(self, recorder: EpisodeRecorder) -> list[RecordedCall]:
        with self._lock:
            return list(recorder.calls)
