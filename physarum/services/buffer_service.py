"""The buffer service: a redis-server (private and embedded, or the one named by buffer.url)
plus the prompt dataset loaded into it. Everyone else opens their own EpisodeStore on `url`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore, redact
from configs import JobConfig
from physarum.rundir import RunDir

log = logging.getLogger(__name__)


class BufferService:
    """Owns the embedded redis-server when there is one; hands out stores."""

    def __init__(self, job: JobConfig, run: RunDir) -> None:
        self.job = job
        self.namespace = job.buffer_namespace
        self._redis: EmbeddedRedis | None = None
        if job.buffer.url:
            self.url = job.buffer.url
            log.info("buffer: using the Redis at %s", redact(self.url))
        else:
            stop_orphan_redis(run.redis)
            self._redis = EmbeddedRedis(run.redis)
            self.url = self._redis.start()
            log.info("buffer: private redis-server on %s (AOF in %s)", self.url, run.redis)
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

    def stop(self) -> None:
        self.store.close()
        if self._redis is not None:
            self._redis.stop()


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
