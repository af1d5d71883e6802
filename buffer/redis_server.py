"""A private redis-server for one job: AOF on, data under the run dir.

`EmbeddedRedis(data_dir).start()` writes `data_dir/redis.conf` (mode 0600, it may hold the
password), starts `redis-server` on a free port of `host` (127.0.0.1 unless told: a job on
a Ray cluster binds the buffer node's IP) and returns its URL. The AOF
(`appendonly yes`, `appendfsync everysec`) lives in `data_dir`, so starting again on the same
directory after a stop or a crash reloads everything that was written. Tests and the app use
this same launcher.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlencode

import redis

logger = logging.getLogger(__name__)

_CANDIDATES = ("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")


class RedisServerError(RuntimeError):
    """redis-server is missing, failed to start, or is already running on this data dir."""


@dataclass(frozen=True)
class RedisTLS:
    """TLS files for a `rediss://` server: PEM certificate and key; `ca_file` signs the cert."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def find_redis_server() -> str:
    """Path of the redis-server binary, or RedisServerError with the install command."""
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    sudo = "" if os.geteuid() == 0 else "sudo "
    raise RedisServerError(
        "redis-server was not found on PATH (needed for the embedded buffer). Install it "
        f"with: {sudo}apt-get install -y redis-server  -- or set buffer.url to an existing "
        "Redis server."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Start and stop a redis-server whose data lives in `data_dir`.

    port: fixed port, or None for a free one (chosen at each start).
    host: the address to bind and put in the URL.
    password: sets `requirepass`; the URL then carries it (percent-encoded).
    tls: serve TLS only (`rediss://`), with `tls-auth-clients no`.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        tls: RedisTLS | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.password = password
        self.host = host
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self._fixed_port = port
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RedisServerError("EmbeddedRedis.url: the server has not been started")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self, port: int) -> str:
        lines = [
            f"bind {self.host}",
            "protected-mode yes",
            "daemonize no",
            f'dir "{self.data_dir}"',
            'logfile "redis.log"',
            'pidfile "redis.pid"',
            "appendonly yes",
            "appendfsync everysec",
            'appendfilename "appendonly.aof"',
            'dbfilename "dump.rdb"',
            'save ""',
            "shutdown-timeout 10",
        ]
        if self.tls is None:
            lines.append(f"port {port}")
        else:
            lines += [
                "port 0",
                f"tls-port {port}",
                f'tls-cert-file "{self.tls.cert_file}"',
                f'tls-key-file "{self.tls.key_file}"',
                f'tls-ca-cert-file "{self.tls.ca_file}"',
                "tls-auth-clients no",
            ]
        if self.password is not None:
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'requirepass "{escaped}"')
        return "\n".join(lines) + "\n"

    def _make_url(self, port: int) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        if self.tls is None:
            return f"redis://{auth}{self.host}:{port}/0"
        query = urlencode({"ssl_ca_certs": str(self.tls.ca_file), "ssl_check_hostname": "false"})
        return f"rediss://{auth}{self.host}:{port}/0?{query}"

    def _check_not_running(self) -> None:
        pidfile = self.data_dir / "redis.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            pidfile.unlink(missing_ok=True)  # stale: the server died without cleaning up
            return
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"redis-server" not in cmdline.read_bytes():
            pidfile.unlink(missing_ok=True)  # the pid was reused by something else
            return
        raise RedisServerError(
            f"a redis-server (pid {pid}) is already running on {self.data_dir}; stop it first "
            "or connect to it with buffer.url"
        )

    def start(self) -> str:
        """Start the server (reloading the AOF in data_dir if any); return its URL."""
        if self.running:
            return self.url
        binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_not_running()
        attempts = 1 if self._fixed_port is not None else 3
        for attempt in range(attempts):
            port = self._fixed_port or free_port(self.host)
            conf = self.data_dir / "redis.conf"
            conf.write_text(self._config(port))
            conf.chmod(0o600)
            self._proc = subprocess.Popen(
                [binary, str(conf)],
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal must not skip the AOF flush
            )
            if self._wait_ready(port):
                self.port, self._url = port, self._make_url(port)
                logger.info(
                    "redis-server pid %d on %s:%d, data in %s",
                    self._proc.pid,
                    self.host,
                    port,
                    self.data_dir,
                )
                return self._url
            logger.warning("redis-server failed to start on port %d (attempt %d)", port, attempt)
        raise RedisServerError(
            f"redis-server did not start in {self.data_dir}; last log lines:\n{self._log_tail()}"
        )

    def _wait_ready(self, port: int) -> bool:
        client = redis.Redis.from_url(self._make_url(port), socket_connect_timeout=1.0)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.BusyLoadingError:
                    pass  # still replaying the AOF
                except redis.ConnectionError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        self._kill()
        return False

    def _log_tail(self, n: int = 15) -> str:
        log = self.data_dir / "redis.log"
        if not log.exists():
            return "(no redis.log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SHUTDOWN SAVE (flushes the AOF), wait for the process; kill it on timeout."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            client = redis.Redis.from_url(self.url, socket_timeout=timeout_s)
            try:
                client.shutdown(save=True)
            except redis.RedisError as exc:
                logger.warning("redis SHUTDOWN failed (%s); terminating pid %d", exc, self.pid)
                self._proc.terminate()
            finally:
                client.close()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "redis-server pid %d did not exit in %.0fs; killing", self.pid, timeout_s
                )
                self._kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (what it wrote to the AOF survives)."""
        self._kill()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
