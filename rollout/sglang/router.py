"""Run `sglang-router` (sglang-router 0.3.2, "SGLang Model Gateway") in front of SGLang workers.

The router runs from the main environment (`python -m sglang_router.launch_router`), starts
with no workers, and workers are added and removed through its HTTP API: `POST /workers`
(202, returns a worker id), `GET /workers`, `DELETE /workers/{id}` (the old `/add_worker`
routes answer 404 in 0.3.2). It forwards `/generate`; it does NOT forward weight updates,
pause/continue or abort, which the engine sends to every worker directly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


class SGLangRouterError(RuntimeError):
    """The router failed to start or refused a worker call; names the URL and the route."""


class SGLangRouter:
    """One sglang-router process and the workers registered with it."""

    def __init__(
        self,
        *,
        port: int,
        log_path: str | Path,
        host: str = "127.0.0.1",
        policy: str = "cache_aware",
        python: str | Path | None = None,
        request_timeout_s: float = 600.0,
        startup_timeout: float = 60.0,
        extra_args: list[str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"router policy: expected one of {POLICIES}, got {policy!r}")
        self.host = host
        self.port = port
        self.policy = policy
        self.python = Path(python) if python is not None else Path(sys.executable)
        self.log_path = Path(log_path)
        self.request_timeout_s = request_timeout_s
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        # set: clients (and our own /workers calls) must send it, as the workers require
        self.api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.worker_ids: dict[str, str] = {}  # worker url -> router worker id
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "sglang_router.launch_router",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--policy",
            self.policy,
            "--request-timeout-secs",
            str(int(self.request_timeout_s)),
            "--log-level",
            "warn",
            *([f"--api-key={self.api_key}"] if self.api_key else []),  # a key may start with "-"
            *self.extra_args,
        ]

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> float:
        """Spawn the router and wait until it answers; returns the seconds it took."""
        began = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while not self.answers():
            code = self._proc.poll()
            if code is not None:
                raise SGLangRouterError(
                    f"{self.url}: router exited with code {code}; see {self.log_path}"
                )
            if time.monotonic() - began > self.startup_timeout:
                self.stop()
                raise SGLangRouterError(
                    f"{self.url}: router not answering after {self.startup_timeout:.0f} s"
                )
            time.sleep(0.2)
        logger.info("sglang-router %s up (policy %s)", self.url, self.policy)
        return time.monotonic() - began

    def answers(self) -> bool:
        """GET /workers answers 200."""
        try:
            return (
                httpx.get(f"{self.url}/workers", headers=self._headers, timeout=2.0).status_code
                == 200
            )
        except httpx.HTTPError:
            return False

    def list_workers(self) -> list[dict[str, Any]]:
        """GET /workers -> the router's worker records (id, url, is_healthy, load, ...)."""
        resp = httpx.get(f"{self.url}/workers", headers=self._headers, timeout=10.0)
        if resp.status_code != 200:
            raise SGLangRouterError(f"{self.url}/workers: HTTP {resp.status_code}: {resp.text}")
        return list(resp.json().get("workers", []))

    def add_worker(
        self, worker_url: str, *, api_key: str | None = None, timeout: float = 60.0
    ) -> str:
        """POST /workers, then wait until the router lists it as healthy; returns its id."""
        body: dict[str, Any] = {"url": worker_url}
        if api_key:
            body["api_key"] = api_key
        resp = httpx.post(f"{self.url}/workers", json=body, headers=self._headers, timeout=10.0)
        if resp.status_code not in (200, 201, 202):
            raise SGLangRouterError(
                f"{self.url}/workers: adding {worker_url}: HTTP {resp.status_code}: {resp.text}"
            )
        worker_id = str(resp.json().get("worker_id", ""))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in self.list_workers():
                if worker.get("url") == worker_url and worker.get("is_healthy", True):
                    self.worker_ids[worker_url] = str(worker.get("id") or worker_id)
                    return self.worker_ids[worker_url]
            time.sleep(0.2)
        raise SGLangRouterError(
            f"{self.url}/workers: {worker_url} not listed healthy after {timeout:.0f} s"
        )

    def remove_worker(self, worker_url: str, *, timeout: float = 30.0) -> None:
        """DELETE /workers/{id} and wait until it is no longer listed."""
        worker_id = self.worker_ids.pop(worker_url, None)
        if worker_id is None:
            ids = [w.get("id") for w in self.list_workers() if w.get("url") == worker_url]
            if not ids:
                return
            worker_id = str(ids[0])
        resp = httpx.delete(f"{self.url}/workers/{worker_id}", headers=self._headers, timeout=10.0)
        if resp.status_code not in (200, 202, 204, 404):
            raise SGLangRouterError(
                f"{self.url}/workers/{worker_id}: removing {worker_url}: "
                f"HTTP {resp.status_code}: {resp.text}"
            )
        deadline = time.monotonic() + timeout
        while any(w.get("url") == worker_url for w in self.list_workers()):
            if time.monotonic() > deadline:
                raise SGLangRouterError(f"{self.url}: {worker_url} still listed after delete")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self._proc.wait(timeout=timeout)
        self.worker_ids.clear()

    def __enter__(self) -> SGLangRouter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
