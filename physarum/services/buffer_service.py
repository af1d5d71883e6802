"""The buffer service: a redis-server (private, or the one named by buffer.url) plus the
prompt dataset loaded into it. Everyone else opens their own EpisodeStore on `url`.

The private server always has a per-job password, kept in the run dir (mode 0600) so a
resumed job reuses it. On an embedded Ray the driver runs it on 127.0.0.1; on a Ray cluster
a small BufferActor runs it on the node its bundle (`cluster.buffer_resources`) lands on, or
the driver's node without one, bound to that node's IP, with its AOF in the shared run dir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import ray

from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore, redact
from configs import JobConfig
from physarum.rundir import RunDir

log = logging.getLogger(__name__)


class BufferService:
    """Owns the embedded redis-server when there is one; hands out stores."""

    def __init__(
        self, job: JobConfig, run: RunDir, *, remote: dict[str, Any] | None = None
    ) -> None:
        """remote: on a Ray cluster, the BufferActor's scheduling options (the node that
        hosts the server); None runs the server in this process, on 127.0.0.1."""
        self.job = job
        self.namespace = job.buffer_namespace
        self._redis: EmbeddedRedis | None = None
        self.actor: Any = None
        if job.buffer.url:
            self.url = job.buffer.url
            log.info("buffer: using the Redis at %s", redact(self.url))
        elif remote is not None:
            self.actor = BufferActor.options(num_cpus=0, **remote).remote()
            self.url = ray.get(self.actor.start.remote(str(run.redis), redis_password(run)))
            log.info("buffer: redis-server on %s (AOF in %s)", redact(self.url), run.redis)
        else:
            stop_orphan_redis(run.redis)
            self._redis = EmbeddedRedis(run.redis, password=redis_password(run))
            self.url = self._redis.start()
            log.info("buffer: private redis-server on %s (AOF in %s)", redact(self.url), run.redis)
        self.store = self.open_store()

    def open_store(self) -> EpisodeStore:
        return EpisodeStore.from_config(
            self.url, self.namespace, self.job.buffer, lease_seconds=self.job.rollout.lease_seconds
        )

    def load_prompts(self, path: Path) -> None:
        data = self.job.data
        report = self.store.load_prompts(
            path,
            seed=data.seed,
            shuffle=data.shuffle,
            on_bad_row=data.on_bad_row,
            max_epochs=data.max_epochs,
        )
        log.info("buffer: %s", report)

    def stats(self) -> dict:
        return dataclasses.asdict(self.store.stats())

    def where(self) -> dict[str, Any]:
        """The buffer's placement.json row (the redis-server's pid and node)."""
        if self.actor is not None:
            return ray.get(self.actor.where.remote())
        from physarum.services.nodes import driver_row

        row = driver_row() | {"role": "buffer"}
        if self._redis is not None:
            row["pid"] = self._redis.pid
        return row

    def lost(self) -> str | None:
        """What happened to the embedded redis-server if it died under the running job
        (killed, crashed); None while it runs, after a stop, or with another server."""
        server = self._redis
        if server is None or server.pid is None or server.running:
            return None
        return f"the buffer's redis-server (pid {server.pid}, AOF in {server.data_dir}) died"

    def stop(self) -> None:
        self.store.close()
        if self._redis is not None:
            self._redis.stop()
        if self.actor is not None:
            try:
                ray.get(self.actor.stop.remote(), timeout=30)
            finally:
                ray.kill(self.actor)


@ray.remote
class BufferActor:
    """Runs the job's redis-server on this actor's node, bound to the node's IP."""

    def __init__(self) -> None:
        self.redis: EmbeddedRedis | None = None

    def start(self, data_dir: str, password: str) -> str:
        from physarum.logs import setup_service_logging

        setup_service_logging(Path(data_dir).parent, "buffer")  # data_dir: run_dir/redis
        stop_orphan_redis(Path(data_dir))  # a crashed driver's server on this node
        host = ray.util.get_node_ip_address()
        self.redis = EmbeddedRedis(data_dir, host=host, password=password)
        return self.redis.start()

    def where(self) -> dict[str, Any]:
        from physarum.services.nodes import where

        row = where("buffer", 0)
        if self.redis is not None:
            row["pid"] = self.redis.pid
        return row

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()


def redis_password(run: RunDir) -> str:
    """The job's Redis password: made once (mode 0600 in the run dir), reused on resume."""
    path = run.redis_password
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    path.chmod(0o600)  # also when it was restored from a backup with looser bits
    return path.read_text().strip()


def stop_orphan_redis(data_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop a redis-server left behind on `data_dir` by a driver that died (kill -9, OOM).

    SIGTERM makes redis flush its AOF before exiting, so nothing acknowledged is lost; the
    resumed job then starts its own server on the same data. Returns True if one was stopped.
    """
    pidfile = data_dir / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"redis-server" not in cmdline:
        return False
    log.warning(
        "buffer: a redis-server (pid %d) from an earlier run still serves %s; "
        "stopping it (its AOF is flushed on SIGTERM)",
        pid,
        data_dir,
    )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    return True
