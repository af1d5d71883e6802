"""The dashboard's server: uvicorn in a daemon thread of the driver, and run_dir/dashboard.json
(url, token, port, pid; mode 0600) so `physarum status` can show the URL while it is live."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from physarum.api import JobState
from physarum.dashboard.app import create_dashboard_app
from physarum.dashboard.token import new_token
from physarum.errors import UserError

log = logging.getLogger("physarum.dashboard")

START_TIMEOUT_S = 30.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so the port cannot be taken between picking and
    serving it (port 0: the OS picks a free one); early requests wait in its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"logging.dashboard_port / dashboard_host: cannot serve the dashboard on "
            f"{host}:{port} ({exc}); pick another port (0 = any free one), an address of this "
            "machine, or run with --no-dashboard"
        ) from exc
    sock.listen(128)
    return sock


class DashboardServer:
    """Serve `state` on host:port (0 = a free port) behind a fresh token."""

    def __init__(
        self,
        state: JobState,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        run_dir: Path | None = None,
        token: str | None = None,
    ) -> None:
        self.host = host
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.token = token or new_token()
        self.info_path = None if run_dir is None else run_dir / "dashboard.json"
        app = create_dashboard_app(state, self.token)
        config = uvicorn.Config(app, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="dashboard"
        )

    @property
    def base_url(self) -> str:
        """Without the token. A wildcard bind is shown by this host's name."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """What to open: the base URL carrying the token."""
        return f"{self.base_url}?token={self.token}"

    def start(self) -> DashboardServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the dashboard's server on {self.host}:{self.port} exited")
            if time.monotonic() > deadline:  # a starved machine: requests queue meanwhile
                log.warning(
                    "dashboard: not serving yet after %.0f s; the job goes on", START_TIMEOUT_S
                )
                break
            time.sleep(0.02)
        self._write_info()
        log.info("dashboard: %s", self.url)
        return self

    def _write_info(self) -> None:
        if self.info_path is None:
            return
        info = {"url": self.url, "base_url": self.base_url, "port": self.port}
        info |= {"host": self.host, "pid": os.getpid(), "token": self.token}
        # complete or absent, never half-written: readers (`physarum status`) may look any time
        tmp = self.info_path.with_name(f".{self.info_path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # holds the token: readable by the owner only
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, self.info_path)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()
        if self.info_path is not None:
            self.info_path.unlink(missing_ok=True)  # present = live (or the driver crashed)
