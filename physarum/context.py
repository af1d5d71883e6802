"""What every mode's driver stands on: the run dir, prepared inputs, Ray, the services,
metrics and the dashboard, with one teardown that stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from configs import JobConfig
from envs.tasks import read_jsonl
from physarum.api import JobState
from physarum.cluster import RayHandle, connect
from physarum.dashboard import DashboardServer
from physarum.dashboard.services import live_view, service_rows
from physarum.errors import ClusterError
from physarum.metrics import MetricsSink
from physarum.prepare import Prepared, export_final, prepare
from physarum.resume import Corrupt, check_buffer, pick_checkpoint, set_aside
from physarum.rundir import RunDir
from physarum.services.buffer_service import BufferService, stop_orphan_redis
from physarum.services.nodes import check_run_dir, driver_row, write_placement
from physarum.services.placement import Placement, embedded_cpus, embedded_resources
from physarum.services.rollout_group import RolloutGroup
from physarum.services.trainer_group import TrainerGroup

log = logging.getLogger(__name__)


class JobContext:
    """Services are started on demand by the mode driver and all stopped by `close`."""

    def __init__(
        self,
        job: JobConfig,
        *,
        resume: bool = False,
        stage: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """resume: continue the run in job.run_dir; otherwise that dir must be empty or
        missing, or (overwrite) a run dir, which is cleared first."""
        # Actors run in another cwd (that of `ray start`), maybe on another node: every path
        # they get is absolute, resolved here against the driver's cwd.
        job = job.with_absolute_paths(Path.cwd())
        self.job = job
        self.resume = resume
        self.stage = stage or job.mode
        self.run = RunDir(job.resolved_run_dir)
        if resume:
            self.run.check_resumable(job)
        else:
            if overwrite and self.run.redis.is_dir():
                stop_orphan_redis(self.run.redis)  # not under a live server's feet
            self.run.claim(overwrite=overwrite)
        self.run.create()
        if not resume:
            self.run.save_identity(job)
        self.run.save_job(job)
        self._resume_from: tuple[tuple[int, Path] | None, Corrupt] | None = None
        self.prepared: Prepared = prepare(job, self.run)
        self.eval_rows = read_jsonl(self.prepared.eval_path)[: job.rollout.eval.n_prompts]
        self._stack = contextlib.ExitStack()
        roles = {"trainers": job.trainer.num_ranks, "workers": job.rollout.num_workers}
        self.ray: RayHandle = connect(
            job.cluster,
            min_cpus=embedded_cpus(job, **roles),
            resources=embedded_resources(job, **roles),
        )
        self._stack.callback(self.ray.shutdown)
        # One machine: servers stay on loopback. A cluster: each binds its node's IP.
        self.local_ip = "127.0.0.1" if self.ray.embedded else None
        if self.ray.embedded and job.rollout.sglang.host is None:
            sglang = job.rollout.sglang.model_copy(update={"host": self.local_ip})
            self.job = job.model_copy(
                update={"rollout": job.rollout.model_copy(update={"sglang": sglang})}
            )
        self._key_sglang_servers()
        self._services: dict[str, Any] = {}
        self.state = JobState(name=job.name, mode=job.mode, stage=self.stage)
        self.dashboard = self._start_dashboard()
        self.metrics: MetricsSink | None = None
        self.placement: Placement | None = None
        self.started = time.monotonic()

    def _key_sglang_servers(self) -> None:
        """SGLang servers the job launches get a per-job API key (0600 in the run dir, never in
        job.yaml) unless rollout.sglang.api_key names one: on a cluster they bind node IPs."""
        rollout = self.job.rollout
        if rollout.engine != "sglang" or rollout.sglang.api_key is not None:
            return
        sglang = rollout.sglang.model_copy(update={"api_key": self.run.secret("sglang_api_key")})
        self.job = self.job.model_copy(
            update={"rollout": rollout.model_copy(update={"sglang": sglang})}
        )

    def _start_dashboard(self) -> DashboardServer | None:
        if not self.job.logging.dashboard:
            return None
        cfg = self.job.logging
        self.state.services = lambda: service_rows(
            self.run.root / "placement.json", live_view(self._services, self.state.version)
        )
        try:
            server = DashboardServer(
                self.state, host=cfg.dashboard_host, port=cfg.dashboard_port, run_dir=self.run.root
            ).start()
        except BaseException:  # e.g. its port taken: stop Ray, started before, then say why
            self.close()
            raise
        self._stack.callback(server.stop)
        return server

    def open_metrics(self, total_steps: int) -> MetricsSink:
        self.metrics = MetricsSink(self.job.logging, self.run.root, total_steps, self.stage)
        self.state.total_steps = total_steps
        self._stack.callback(self.metrics.close)
        self.write_placement()  # every mode opens its metrics once its services are up
        return self.metrics

    def write_placement(self) -> Path:
        """placement.json: the node, pid, device and GPUs of every actor and the driver."""
        rows = [driver_row()]
        for service in self._services.values():
            found = service.where()
            rows += found if isinstance(found, list) else [found]
        path = write_placement(self.run.root, rows)
        log.info(
            "placement: %s", ", ".join(f"{r['role']}-{r['rank']}@{r['node_ip']}" for r in rows)
        )
        return path

    def log(self, step: int, version: int, metrics: dict[str, Any]) -> None:
        assert self.metrics is not None, "open_metrics first"
        self.metrics.log(step, metrics)
        self.state.publish(step, version, metrics)

    def reserve(self, *, trainers: int, workers: int, buffer: bool = False) -> None:
        """Reserve every bundle (the buffer's only on a cluster: embedded, the driver runs
        it); on a cluster, then check that each node holding one sees the run dir."""
        on_cluster = not self.ray.embedded
        self.placement = Placement(
            self.job, trainers=trainers, workers=workers, buffer=buffer and on_cluster
        )
        self._stack.callback(self.placement.remove)
        if on_cluster:
            check_run_dir(self.run.root, set(self.placement.node_ids().values()))

    def start_buffer(self, prompts: Path | None) -> BufferService:
        buffer = BufferService(self.job, self.run, remote=self._buffer_node())
        self._services["buffer"] = buffer
        self._stack.callback(buffer.stop)
        if self.resume:  # before the prompts are loaded: a rebuilt buffer is caught as such
            latest, corrupt = self._resume_from = pick_checkpoint(self.run)
            check_buffer(self.run, latest, buffer.stats(), corrupt)
        if prompts is not None:
            buffer.load_prompts(prompts)
        self.state.buffer_stats = buffer.stats
        return buffer

    def _buffer_node(self) -> dict[str, Any] | None:
        """Where a cluster job's redis-server runs: the buffer bundle, else the driver's node
        (None on an embedded Ray: the driver runs it itself)."""
        if self.ray.embedded:
            return None
        if self.placement is not None and "buffer" in self.placement.names:
            return self.placement.bundle("buffer")
        here = ray.get_runtime_context().get_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}

    def start_trainer(
        self,
        *,
        store_url: str | None,
        total_steps: int,
        policy_loss: str | None = None,
        model_dir: Path | None = None,
    ) -> TrainerGroup:
        group = TrainerGroup(
            self.job,
            model_dir or self.prepared.model_dir,
            store_url=store_url,
            total_steps=total_steps,
            policy_loss=policy_loss,
            placement=self.placement,
            bind_ip=self.local_ip,
        )
        self._services["trainer"] = group
        self._stack.callback(group.shutdown)
        return group

    def start_rollout(self, *, store_url: str | None) -> RolloutGroup:
        group = RolloutGroup(
            self.job,
            self.prepared.model_dir,
            self.prepared.tokenizer_dir,
            store_url=store_url,
            placement=self.placement,
        )
        self._services["rollout"] = group
        self._stack.callback(group.shutdown)
        self.state.workers = list(group.ids)
        return group

    def restore_latest(self, trainer: TrainerGroup) -> int:
        """On resume, load the newest checkpoint that passes its checksums, once the buffer
        is found to match it (physarum/resume.py); returns the step to continue from."""
        if not self.resume:
            return 0
        # checked against the buffer by start_buffer (RL); SFT has no buffer
        latest, corrupt = self._resume_from or pick_checkpoint(self.run)
        if latest is None:
            return 0
        set_aside(corrupt, latest)
        step, path = latest
        trainer.restore(path)
        log.info("resumed from %s (step %d)", path, step)
        return step

    def evaluate(self, rollout: RolloutGroup, step: int) -> dict[str, float]:
        started = time.monotonic()
        result, samples = rollout.evaluate(self.eval_rows)
        result["eval/seconds"] = time.monotonic() - started
        out = self.run.root / "eval" / f"step_{step}.jsonl"
        out.parent.mkdir(exist_ok=True)
        out.write_text("".join(json.dumps(s) + "\n" for s in samples))
        log.info(
            "eval at step %d: accuracy %.3f over %d held-out prompts",
            step,
            result.get("eval/accuracy", float("nan")),
            len(self.eval_rows),
        )
        return result

    def checkpoint(self, trainer: TrainerGroup, step: int) -> Path:
        path = self.run.checkpoint(step)
        if (path / "COMPLETE").exists():  # the last step is often an interval step too
            return path
        trainer.checkpoint(path)
        self._prune_checkpoints()
        return path

    def _prune_checkpoints(self) -> None:
        import shutil

        keep = self.job.checkpoint.keep_last
        steps = sorted(
            int(p.name.split("_")[1])
            for p in self.run.checkpoints.glob("step_*")
            if (p / "COMPLETE").exists()
        )
        for old in steps[:-keep]:
            shutil.rmtree(self.run.checkpoint(old), ignore_errors=True)

    def save_final(self, trainer: TrainerGroup) -> Path:
        trainer.save_hf(self.run.hf)
        export_final(self.prepared.model_dir, self.prepared.tokenizer_dir, self.run.hf)
        log.info("final model -> %s", self.run.hf)
        return self.run.hf

    @staticmethod
    def due(step: int, interval: int) -> bool:
        return interval > 0 and step % interval == 0

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> JobContext:
        return self

    def __exit__(self, *exc: object) -> None:
        buffer = self._services.get("buffer")
        lost = buffer.lost() if exc[0] is not None and buffer is not None else None
        self.close()
        if lost:  # the actors' errors are only its consequence: say what to run next
            raise ClusterError(
                f"{lost} while the job ran. The job stops here; what redis-server wrote to "
                "its AOF survives, continue from the last checkpoint with: physarum run "
                f"--resume {self.run.root}"
            ) from exc[1]  # type: ignore[misc]


@contextlib.contextmanager
def job_context(job: JobConfig, **kwargs: Any) -> Iterator[JobContext]:
    ctx = JobContext(job, **kwargs)
    try:
        yield ctx
    finally:
        ctx.close()


def wait_all(refs: list[ray.ObjectRef]) -> list[Any]:
    return ray.get(refs)
