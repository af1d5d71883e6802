"""Launch, watch and stop one SGLang server process (`sglang.launch_server`) per rollout worker.

`ServerArgs` maps our config (`rollout.sglang`, `configs.services.SGLangConfig`) to SGLang
0.5.23 launch flags; `SGLangServer` owns the subprocess: it starts it in its own process group
with its log streamed to a file in the run directory, waits for `GET /health`, and stops it
with SIGTERM -> wait -> SIGKILL of the whole group (SGLang's scheduler and detokenizer are
child processes). A plain class: a Ray actor can wrap it.

On a CPU (`cpu=True`) the server runs through `cpu_launch.py` (see its docstring for the one
SGLang fallback it adds) with the flags that make SGLang serve here:
`--device cpu --attention-backend torch_native --sampling-backend pytorch
--model-impl transformers --skip-server-warmup` (reference/sglang_api.md A.1, A.3).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from configs.services import SGLangConfig

logger = logging.getLogger(__name__)

CPU_LAUNCHER = Path(__file__).with_name("cpu_launch.py")
CPU_FLAGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--sampling-backend",
    "pytorch",
    "--model-impl",
    "transformers",
    "--skip-server-warmup",
)
# ServerArgs field -> SGLang flag. A None value is left out (SGLang's default applies).
_FLAGS: dict[str, str] = {
    "model_path": "--model-path",
    "tokenizer_path": "--tokenizer-path",
    "host": "--host",
    "port": "--port",
    "tp": "--tp-size",
    "dtype": "--dtype",
    "mem_fraction_static": "--mem-fraction-static",
    "quantization": "--quantization",
    "context_length": "--context-length",
    "api_key": "--api-key",
    "max_total_tokens": "--max-total-tokens",
    "weight_version": "--weight-version",
    "random_seed": "--random-seed",
    "log_level": "--log-level",
}
# Variables of the main environment that must not leak into the SGLang interpreter.
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


class SGLangServerError(RuntimeError):
    """A server failed to start, died, or did not become healthy; names the URL and log file."""


def serving_host(cfg: SGLangConfig) -> str:
    """The address servers, the router and the weight-sync master bind: `cfg.host`, else
    this node's IP when inside a Ray job (other nodes must reach it), else 127.0.0.1. The
    driver sets `host` to 127.0.0.1 for a job on an embedded (one-machine) Ray."""
    if cfg.host:
        return cfg.host
    try:
        import ray
    except ImportError:  # the SGLang environment has no Ray: a single-host setting
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerArgs:
    """The launch flags of one SGLang server (`python -m sglang.launch_server --help`)."""

    model_path: str
    port: int
    host: str = "127.0.0.1"
    tokenizer_path: str | None = None
    tp: int = 1
    dtype: str = "bfloat16"
    mem_fraction_static: float | None = None
    quantization: str | None = None
    context_length: int | None = None
    api_key: str | None = None
    max_total_tokens: int | None = None
    """KV-cache tokens; on a CPU set it (SGLang otherwise sizes the pool from free RAM)."""
    weight_version: str | None = None
    """The version a fresh server reports before any update (SGLang's default: "default")."""
    random_seed: int | None = None
    log_level: str | None = None
    cpu: bool = True
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def from_config(
        cls, cfg: SGLangConfig, *, model_path: str, port: int, **overrides: Any
    ) -> ServerArgs:
        """Worker args from the `rollout.sglang` section; `overrides` set any other field."""
        base = {
            "model_path": model_path,
            "port": port,
            "host": serving_host(cfg),
            "tp": cfg.tp,
            "dtype": cfg.dtype,
            "mem_fraction_static": cfg.mem_fraction_static,
            "quantization": cfg.quantization,
            "context_length": cfg.context_length,
            "api_key": cfg.api_key,
            "cpu": cfg.cpu,
            "extra_args": list(cfg.extra_args),
        }
        base.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise TypeError(f"ServerArgs: unknown field(s) {unknown}; expected {sorted(known)}")
        return cls(**base)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_argv(self) -> list[str]:
        """The launch_server flags, CPU flags included when `cpu`."""
        argv: list[str] = []
        for name, flag in _FLAGS.items():
            value = getattr(self, name)
            if value is not None:
                text = str(value)  # a random API key may start with "-": argparse would
                argv += [f"{flag}={text}"] if text.startswith("-") else [flag, text]  # misread it
        if self.cpu:
            argv += list(CPU_FLAGS)
        return argv + list(self.extra_args)

    def command(self, python: str | Path) -> list[str]:
        """The full command line for the SGLang interpreter `python`."""
        entry = [str(CPU_LAUNCHER)] if self.cpu else ["-m", "sglang.launch_server"]
        return [str(python), *entry, *self.to_argv()]


class SGLangServer:
    """One SGLang server subprocess: start, wait for /health, stop, kill, restart."""

    def __init__(
        self,
        args: ServerArgs,
        *,
        python: str | Path,
        log_path: str | Path,
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.python = Path(python)
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.args.url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Spawn the server (its own process group); returns at once. See `wait_healthy`."""
        if self.is_running():
            raise SGLangServerError(f"{self.url}: already running (pid {self.pid})")
        cmd = self.args.command(self.python)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== physarum: starting {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
            )
        logger.info("sglang server %s: pid %d, log %s", self.url, self._proc.pid, self.log_path)

    def _log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def check_health(self, timeout: float = 5.0) -> bool:
        """GET /health answered 200 (and the process is alive)."""
        if not self.is_running():
            return False
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        try:
            resp = httpx.get(f"{self.url}/health", timeout=timeout, headers=headers)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def wait_healthy(self, timeout: float | None = None, poll: float = 1.0) -> float:
        """Block until /health answers 200; returns the seconds waited.

        Raises SGLangServerError (with the log's tail) when the process exits or `timeout`
        (default: startup_timeout) passes; on timeout the server is stopped.
        """
        timeout = self.startup_timeout if timeout is None else timeout
        start = time.monotonic()
        while True:
            if self._proc is None:
                raise SGLangServerError(f"{self.url}: not started")
            code = self._proc.poll()
            if code is not None:
                raise SGLangServerError(
                    f"{self.url}: server exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            if self.check_health(timeout=min(5.0, timeout)):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                self.stop()
                raise SGLangServerError(
                    f"{self.url}: not healthy after {timeout:.0f} s (stopped it); "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(poll)

    def launch(self) -> float:
        """start() + wait_healthy(); returns (and records) the start-up seconds."""
        began = time.monotonic()
        self.start()
        self.wait_healthy()
        self.startup_seconds = time.monotonic() - began
        logger.info("sglang server %s healthy after %.1f s", self.url, self.startup_seconds)
        return self.startup_seconds

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server, wait up to `timeout`, then SIGKILL its whole process group.

        SIGTERM goes to the main process only: SGLang then drains and exits 0, stopping its
        scheduler and detokenizer itself (signalling them too makes it take the crash path).
        Returns the server's exit code (None if it was never started).
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("sglang %s ignored SIGTERM for %.0f s: SIGKILL", self.url, timeout)
            self._signal_group(signal.SIGKILL)
            code = self._proc.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)  # children that outlived their parent
        self._wait_group_gone(timeout)
        return code

    def _wait_group_gone(self, timeout: float) -> None:
        """Poll until no process of the group is left (SIGKILL is asynchronous)."""
        if self._proc is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self._proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        logger.warning("sglang server %s: processes of group %d still alive", self.url, self.pid)

    def kill(self) -> None:
        """SIGKILL the whole group at once (what a crash looks like to the engine)."""
        self._signal_group(signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout=30)
            self._wait_group_gone(30)

    def restart(self, args: ServerArgs | None = None) -> float:
        """Stop (if running), optionally change the args, launch again; returns start-up s."""
        if self.is_running():
            self.stop()
        if args is not None:
            self.args = args
        return self.launch()

    def __enter__(self) -> SGLangServer:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
