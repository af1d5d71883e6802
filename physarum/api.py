"""The running job's JSON API and dashboard (FastAPI), served from the driver on 127.0.0.1.

GET /api/status   stage, step/total, weight version, elapsed, ETA, workers
GET /api/metrics  metric records (?since=N returns records after the first N)
GET /api/buffer   the buffer's stats (queues, lag, staleness histogram, drops)
GET /             a one-page dashboard polling the above
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

log = logging.getLogger(__name__)


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
            return state.records[max(since, 0) :]

    @app.get("/api/buffer")
    def buffer() -> dict[str, Any]:
        return state.buffer_stats() if state.buffer_stats else {}

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return _DASHBOARD.replace("{{NAME}}", state.name)

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DashboardServer:
    """uvicorn in a daemon thread; `url` once started."""

    def __init__(self, state: JobState, port: int = 0) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            create_app(state), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="dashboard")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DashboardServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("dashboard at %s", self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)


_DASHBOARD = """<!doctype html><html><head><meta charset="utf-8"><title>physarum {{NAME}}</title>
<style>body{font:14px system-ui;margin:2em;color:#222}pre{background:#f6f6f6;padding:1em}
canvas{border:1px solid #ddd;margin-right:1em}</style></head><body>
<h2>physarum: {{NAME}}</h2><pre id="status">loading…</pre>
<canvas id="reward" width="420" height="200"></canvas>
<canvas id="acc" width="420" height="200"></canvas><h3>buffer</h3><pre id="buffer"></pre>
<script>
function draw(id, pts, label){const c=document.getElementById(id),g=c.getContext('2d');
g.clearRect(0,0,c.width,c.height);g.fillText(label,8,14);if(!pts.length)return;
const xs=pts.map(p=>p[0]),ys=pts.map(p=>p[1]),x0=Math.min(...xs),x1=Math.max(...xs)||1,
y0=Math.min(0,...ys),y1=Math.max(1,...ys);g.beginPath();pts.forEach((p,i)=>{
const x=20+(p[0]-x0)/((x1-x0)||1)*(c.width-30),y=c.height-15-(p[1]-y0)/(y1-y0)*(c.height-35);
i?g.lineTo(x,y):g.moveTo(x,y)});g.stroke();}
async function tick(){const s=await (await fetch('api/status')).json();
document.getElementById('status').textContent=JSON.stringify(s,null,1);
const m=await (await fetch('api/metrics')).json();
draw('reward',m.filter(r=>'reward' in r).map(r=>[r.step,r.reward]),'reward');
draw('acc',m.filter(r=>'eval/accuracy' in r).map(r=>[r.step,r['eval/accuracy']]),'held-out acc');
document.getElementById('buffer').textContent=JSON.stringify(
  await (await fetch('api/buffer')).json(),null,1);}
tick();setInterval(tick,2000);
</script></body></html>"""
