"""Rollout workers: one async Ray actor per engine, producing episode groups continuously.

The group pushes weights to every worker, splits eval rows across them, and watches them: a
worker that dies is restarted and receives the current weights before it produces again
(its leased prompts return to the queue when their leases expire).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from configs import JobConfig
from physarum.cluster import actor_options

log = logging.getLogger(__name__)


@ray.remote
class RolloutActor:
    """One rollout worker around rollout.worker.RolloutWorkerCore."""

    def __init__(
        self,
        job: JobConfig,
        model_dir: str,
        tokenizer_dir: str,
        worker_id: str,
        store_url: str | None,
    ) -> None:
        logging.basicConfig(
            level=job.logging.level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s"
        )
        from buffer.store import EpisodeStore
        from rollout.worker import RolloutWorkerCore

        store = (
            EpisodeStore.from_config(
                store_url, job.buffer_namespace, job.buffer, lease_seconds=job.rollout.lease_seconds
            )
            if store_url
            else None
        )
        self.core = RolloutWorkerCore(
            job,
            model_dir=Path(model_dir),
            tokenizer_dir=Path(tokenizer_dir),
            worker_id=worker_id,
            store=store,
        )
        self._task: asyncio.Task | None = None

    async def ready(self) -> bool:
        return await self.core.engine.health()

    async def update_weights(self, update: Any) -> int:
        return await self.core.update_weights(update)

    async def start(self, share: int, start_version: int) -> None:
        producer = self.core.make_producer(share)
        producer.stats.groups_pushed = start_version * share  # owes batches from here on
        producer.set_weight_version(start_version)
        self._task = asyncio.create_task(producer.run())

    async def run_until_stopped(self) -> None:
        """Completes when production stops; raises what made it fail."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self.core.producer is not None:
            self.core.producer.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def evaluate(
        self, rows: list[dict], k: int | None = None, temperature: float | None = None
    ) -> dict[str, float]:
        return await self.core.evaluate(rows, k=k, temperature=temperature)

    async def stats(self) -> dict[str, float]:
        return self.core.producer.stats.snapshot() if self.core.producer else {}

    async def generate_rows(
        self, rows: list[dict], n: int, temperature: float | None = None
    ) -> list[list]:
        """n scored samples of each row, generated concurrently (rejection sampling)."""
        from rollout.producer import sampling_from_config

        core = self.core
        sampling = sampling_from_config(core.job.rollout, core.stop_ids, temperature=temperature)
        limit = asyncio.Semaphore(max(1, core.job.rollout.max_running // n))

        async def one(row: dict) -> list:
            async with limit:
                episodes = await core.generate_for_row(row, sampling, n)
                await core.reward_fn.score_group(episodes)
                return episodes

        return list(await asyncio.gather(*(one(row) for row in rows)))

    def shutdown(self) -> None:
        self.core.shutdown()


class EngineStalledError(TimeoutError):
    """A rollout worker did not answer within the configured timeout."""


class RolloutGroup:
    """Handle on every rollout worker, with restart on death."""

    def __init__(
        self,
        job: JobConfig,
        model_dir: Path,
        tokenizer_dir: Path,
        *,
        store_url: str | None,
        placement: Any = None,
    ) -> None:
        self.job = job
        self.args = (str(model_dir), str(tokenizer_dir))
        self.store_url = store_url
        self.placement = placement
        self.options = actor_options(
            job.cluster.rollout_cpus, job.cluster.rollout_gpus, threads=job.rollout.threads
        )
        self.ids = [f"rollout-{i}" for i in range(job.rollout.num_workers)]
        self.actors = {wid: self._spawn(wid) for wid in self.ids}
        self.latest_update: ray.ObjectRef | None = None
        self.latest_version = 0
        self.runs: dict[str, ray.ObjectRef] = {}
        self.restarts = 0
        log.info("rollout: starting %d %s worker(s)", len(self.ids), job.rollout.engine)

    def _spawn(self, worker_id: str) -> Any:
        strategy = self.placement.bundle(worker_id) if self.placement else {}
        return RolloutActor.options(**self.options, **strategy).remote(
            self.job, *self.args, worker_id, self.store_url
        )

    @property
    def share(self) -> int:
        per_step = self.job.trainer.prompts_per_step
        return -(-per_step // len(self.ids))

    def push_weights(self, update_ref: ray.ObjectRef, version: int, *, wait: bool) -> None:
        """Send the update to every worker; they apply it between two decode steps."""
        self.latest_update, self.latest_version = update_ref, version
        refs = [a.update_weights.remote(update_ref) for a in self.actors.values()]
        if wait:
            ray.get(refs)

    def start(self) -> None:
        for wid, actor in self.actors.items():
            ray.get(actor.start.remote(self.share, self.latest_version))
            self.runs[wid] = actor.run_until_stopped.remote()

    def check(self) -> None:
        """Restart dead workers; re-raise a worker's own failure (a bug is not a crash)."""
        done, _ = ray.wait(list(self.runs.values()), timeout=0, num_returns=len(self.runs))
        for wid, ref in list(self.runs.items()):
            if ref not in done:
                continue
            try:
                ray.get(ref)
            except RayActorError:
                self._restart(wid)
                continue
            raise RuntimeError(f"{wid}: production stopped unexpectedly")

    def _restart(self, worker_id: str) -> None:
        self.restarts += 1
        log.warning("rollout: %s died; restarting it (restart #%d)", worker_id, self.restarts)
        actor = self._spawn(worker_id)
        ray.get(actor.ready.remote())
        if self.latest_update is not None:
            ray.get(actor.update_weights.remote(self.latest_update))
        ray.get(actor.start.remote(self.share, self.latest_version))
        self.actors[worker_id] = actor
        self.runs[worker_id] = actor.run_until_stopped.remote()
        log.info("rollout: %s is back at weight version %d", worker_id, self.latest_version)

    def evaluate(self, rows: list[dict], **kwargs: Any) -> tuple[dict[str, float], list[dict]]:
        """(merged metrics, every sample) of the rows split across workers."""
        actors = list(self.actors.values())
        shards = [rows[i :: len(actors)] for i in range(len(actors))]
        refs = [a.evaluate.remote(s, **kwargs) for a, s in zip(actors, shards, strict=True) if s]
        # one request timeout per wave of max_running prompts, plus one: never a silent hang
        waves = -(-max(len(s) for s in shards) // self.job.rollout.max_running) + 1
        timeout = self.job.rollout.request_timeout_s * waves
        try:
            results = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise EngineStalledError(
                f"eval of {len(rows)} prompts did not finish within {timeout:.0f} s "
                f"(rollout.request_timeout_s={self.job.rollout.request_timeout_s}): a rollout "
                "worker or its environment stopped answering"
            ) from None
        metrics = _merge_eval([r.metrics for r in results], [len(s) for s in shards if s])
        return metrics, [sample for r in results for sample in r.samples]

    def generate_rows(self, rows: list[dict], n: int) -> list[list]:
        """Scored samples of every row, the rows split across workers; row order kept."""
        actors = list(self.actors.values())
        shards = [rows[i :: len(actors)] for i in range(len(actors))]
        results = ray.get(
            [a.generate_rows.remote(s, n) for a, s in zip(actors, shards, strict=True)]
        )
        out: list[list] = [[] for _ in rows]
        for offset, groups in enumerate(results):
            for j, group in enumerate(groups):
                out[offset + j * len(actors)] = group
        return out

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for snapshot in ray.get([a.stats.remote() for a in self.actors.values()]):
            for key, value in snapshot.items():
                merged[key] = merged.get(key, 0.0) + value
        for mean in ("rollout/reward_mean", "rollout/busy_fraction"):
            if mean in merged:
                merged[mean] /= len(self.actors)
        merged["rollout/restarts"] = float(self.restarts)
        return merged

    def stop(self) -> None:
        ray.get([a.stop.remote() for a in self.actors.values()])

    def shutdown(self) -> None:
        for actor in self.actors.values():
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            ray.kill(actor)


def _merge_eval(results: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """Prompt-weighted mean of per-worker eval metrics (sums for counts and rates)."""
    total = sum(sizes)
    merged: dict[str, float] = {}
    additive = ("eval/prompts", "eval/errors", "eval/gen_tokens_per_s")
    for result, size in zip(results, sizes, strict=True):
        for key, value in result.items():
            weight = 1.0 if key in additive else size / total
            merged[key] = merged.get(key, 0.0) + value * weight
    return merged
