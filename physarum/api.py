"""The running job's JSON API (FastAPI), served from the driver by `physarum.dashboard`
(which adds the token, the page and its charts).

GET /api/status    stage, step/total, weight version, elapsed, ETA, workers
GET /api/metrics   metric records (?since=N returns records after the first N)
GET /api/buffer    the buffer's stats (queues, lag, staleness histogram, drops)
GET /api/services  trainer ranks, rollout workers, buffer, driver: node, device, health, version
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI


@dataclass
class JobState:
    """What the driver publishes; read by the API. Updated under a lock."""

    name: str
    mode: str
    stage: str = "starting"
    step: int = 0
    total_steps: int = 0
    version: int = 0
    started: float = field(default_factory=time.time)
    records: list[dict[str, Any]] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    buffer_stats: Callable[[], dict[str, Any]] | None = None
    services: Callable[[], list[dict[str, Any]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def publish(self, step: int, version: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            self.step, self.version = step, version
            self.records.append({"step": step, "stage": self.stage, **metrics})

    def status(self) -> dict[str, Any]:
        with self._lock:
            elapsed = time.time() - self.started
            rate = elapsed / self.step if self.step else None
            eta = rate * (self.total_steps - self.step) if rate else None
            return {
                "name": self.name,
                "mode": self.mode,
                "stage": self.stage,
                "step": self.step,
                "total_steps": self.total_steps,
                "version": self.version,
                "elapsed_s": round(elapsed, 1),
                "eta_s": None if eta is None else round(eta, 1),
                "workers": list(self.workers),
            }


def create_app(state: JobState) -> FastAPI:
    app = FastAPI(title=f"physarum: {state.name}")

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return state.status()

    @app.get("/api/metrics")
    def metrics(since: int = 0) -> list[dict[str, Any]]:
        with state._lock:
            records = state.records[max(since, 0) :]
        return [{k: _finite(v) for k, v in r.items()} for r in records]

    @app.get("/api/buffer")
    def buffer() -> dict[str, Any]:
        return state.buffer_stats() if state.buffer_stats else {}

    @app.get("/api/services")
    def services() -> list[dict[str, Any]]:
        return state.services() if state.services else []

    return app


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they go out as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
