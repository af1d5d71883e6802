"""A private redis-server for one job: AOF on, data under the run dir.

`EmbeddedRedis(data_dir).start()` writes `data_dir/redis.conf` (mode 0600: it holds the
password), starts `redis-server` on a free port of `host` (127.0.0.1 unless told: a job on
a Ray cluster binds the buffer node's IP) and returns its URL, which carries the password.
There is always one (`requirepass`): the job's own, or a random one made for this server, so
no other local user can read or write the buffer. `data_dir` is mode 0700. The AOF
(`appendonly yes`, `appendfsync everysec`) lives in `data_dir`, so starting again on the same
directory after a stop or a crash reloads everything that was written. A truncated AOF is
refused (`aof-load-truncated no`): the server does not start and AOFTruncatedError names the
file, instead of silently dropping the writes it lost. Tests and the app use this launcher.
"""

from __future__ import annotations

import logging
import os
import secrets
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

_AOF_TRUNCATED = "Unexpected end of file reading the append only file"
_CANDIDATES = ("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")


class RedisServerError(RuntimeError):
    """redis-server is missing, failed to start, or is already running on this data dir."""


class AOFTruncatedError(RedisServerError, ValueError):
    """The AOF in the data dir ends in the middle of a command: writes were lost (a
    ValueError too: the CLI prints it as one line, it is the user's data to repair)."""


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
    password: sets `requirepass`; the URL carries it (percent-encoded). None makes a random
        one for this server (there is no password-less server).
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
        self.password = password if password is not None else secrets.token_urlsafe(32)
        if not self.password:
            raise ValueError("password: an empty password is no password; give a non-empty one")
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
            "aof-load-truncated no",  # a lost tail must stop the start, not vanish silently
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
        escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'requirepass "{escaped}"')
        return "\n".join(lines) + "\n"

    def _make_url(self, port: int) -> str:
        auth = f":{quote(self.password, safe='')}@"
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
        self.data_dir.chmod(0o700)  # the AOF holds every prompt and episode of the job
        self._check_not_running()
        attempts = 1 if self._fixed_port is not None else 3
        for attempt in range(attempts):
            port = self._fixed_port or free_port(self.host)
            conf = self.data_dir / "redis.conf"
            conf.write_text(self._config(port))
            conf.chmod(0o600)
            log_from = self._log_size()
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
            self._raise_if_truncated(log_from)
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

    def _log_size(self) -> int:
        log = self.data_dir / "redis.log"
        return log.stat().st_size if log.exists() else 0

    def _raise_if_truncated(self, log_from: int) -> None:
        """AOFTruncatedError when this start's log says redis refused a truncated AOF."""
        log = self.data_dir / "redis.log"
        if not log.exists():
            return
        with log.open("rb") as f:
            f.seek(log_from)
            lines = f.read().decode(errors="replace").splitlines()
        said = [line for line in lines if _AOF_TRUNCATED in line]
        if not said:
            return
        manifest = next(self.data_dir.rglob("*.manifest"), None)
        raise AOFTruncatedError(
            f"the buffer's AOF in {self.data_dir} is truncated: the writes at its end were "
            "lost, so the buffer may no longer match the job's checkpoints; redis-server "
            "refused to load it (aof-load-truncated no) and nothing was changed. Way out: "
            "keep a copy of the directory, cut the broken tail with `redis-check-aof --fix "
            f"{manifest or 'FILE'}` (it says what it drops), then resume (the resume checks the "
            "buffer against the checkpoint); or start the job afresh with --overwrite. "
            f"redis-server said: {said[-1].split('# ', 1)[-1]}"
        )

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
