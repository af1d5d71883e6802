"""Starting the embedded engine's HTTP server: `serve_engine` (blocking, for the CLI
`physarum serve-engine`) and `ServerThread` (uvicorn in a background thread, for tests and
for in-process use)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn

from rollout.embedded.engine import EmbeddedEngine
from rollout.server.app import build_app
from rollout.server.auth import check_access
from rollout.server.state import ServerState

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def load_engine(
    model_dir: str | Path,
    *,
    fp8: bool = False,
    max_running: int = 64,
    tokenizer_dir: str | Path | None = None,
    context_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> EmbeddedEngine:
    """An EmbeddedEngine over an HF checkpoint directory (and its tokenizer, if any), with
    the model, its KV cache and the sampling state on `device`."""
    from models.checkpoint import from_pretrained
    from models.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = from_pretrained(model_dir, dtype=dtype, device=device)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    tokenizer = None
    if tokenizer_dir is not None or any((tok_dir / f).exists() for f in _TOKENIZER_FILES):
        tokenizer = load_tokenizer(tok_dir)
    else:
        logger.warning("%s: no tokenizer files; serving token ids only (no text)", model_dir)
    return EmbeddedEngine(
        model,
        tokenizer=tokenizer,
        max_running=max_running,
        context_len=context_len,
        fp8=fp8,
        name=model_dir.name,
    )


def serve_device(setting: str) -> torch.device:
    """`--device` of serve-engine: auto | cpu | cuda, every visible GPU counting as given."""
    from models.device import resolve_device

    visible = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else None
    return resolve_device(setting, gpu_ids=visible)


_SERVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def serve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`--dtype` of serve-engine: auto = bfloat16 on a GPU, float32 on the CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in _SERVE_DTYPES:
        raise ValueError(f"--dtype: expected auto, float32 or bfloat16, got {setting!r}")
    return _SERVE_DTYPES[setting]


def make_state(
    engine: EmbeddedEngine,
    model_path: str,
    *,
    tokenizer_path: str | None = None,
    api_key: str | None = None,
    no_auth: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    fp8: bool = False,
) -> ServerState:
    """The state of a server for `engine`: it needs `api_key`, or no_auth=True on a loopback
    `host` (EngineAuthError otherwise, before anything binds)."""
    check_access(api_key, no_auth, host)
    args: dict[str, Any] = {
        "model_path": model_path,
        "tokenizer_path": tokenizer_path,
        "host": host,
        "port": port,
        "device": str(engine.model.device) if hasattr(engine.model, "device") else "cpu",
        "quantization": "fp8" if fp8 else None,
        "max_running_requests": engine.sched.slots.num_slots,
        "context_length": engine.sched.context_len,
        "api_key": None if api_key is None else "<set>",
        "skip_tokenizer_init": engine.tokenizer is None,
    }
    return ServerState(
        engine=engine,
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        api_key=api_key,
        no_auth=no_auth,
        server_args=args,
    )


def serve_engine(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    no_auth: bool = False,
    fp8: bool = False,
    max_running: int = 64,
    tokenizer_dir: str | Path | None = None,
    context_len: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_n: int = 64,
    max_body_mb: float = 16.0,
) -> None:
    """Load the checkpoint and serve it until interrupted (blocking).

    max_n: samples one request may ask for; max_body_mb: larger request bodies get 413
    (weight-update routes excepted: ServerState.max_weight_body_bytes).
    device: auto | cpu | cuda (cluster.device's values). Outside Ray every GPU this process
    sees counts as given, so auto means cuda:0 whenever torch sees a GPU.
    dtype: auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16.
    api_key / no_auth: see auth.py; refused before the checkpoint is loaded.
    """
    check_access(api_key, no_auth, host)
    where = serve_device(device)
    engine = load_engine(
        model_dir,
        fp8=fp8,
        max_running=max_running,
        tokenizer_dir=tokenizer_dir,
        context_len=context_len,
        dtype=serve_dtype(dtype, where),
        device=where,
    )
    tok = str(tokenizer_dir or model_dir) if engine.tokenizer is not None else None
    state = make_state(
        engine,
        str(model_dir),
        tokenizer_path=tok,
        api_key=api_key,
        no_auth=no_auth,
        host=host,
        port=port,
        fp8=fp8,
    )
    if max_n < 1 or not max_body_mb > 0:
        raise ValueError(f"max_n >= 1 and max_body_mb > 0 expected, got {max_n}, {max_body_mb}")
    state.max_n, state.max_body_bytes = max_n, int(max_body_mb * 2**20)
    logger.info("serving %s on http://%s:%d (%s)", model_dir, host, port, where)
    try:
        uvicorn.run(build_app(state), host=host, port=port, log_level="info")
    finally:
        engine.shutdown()


class ServerThread:
    """uvicorn serving an engine from a background thread (tests, in-process use).

    `start()` returns once the socket accepts connections; `stop()` shuts uvicorn down (the
    engine is left running: its owner shuts it down).
    """

    def __init__(
        self,
        state: ServerState,
        host: str = "127.0.0.1",
        port: int | None = None,
        app: Any = None,  # an ASGI app serving `state` other than build_app's (agent capture)
    ):
        check_access(state.api_key, state.no_auth, host)  # whichever app serves it
        self.host = host
        self.port = port or free_port(host)
        state.server_args.update(host=host, port=self.port)
        config = uvicorn.Config(
            app or build_app(state), host=host, port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
