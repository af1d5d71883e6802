"""The rollout worker's Ray actor: one per engine, wrapping rollout.worker.RolloutWorkerCore.

It runs on the worker's process: builds the engine and producer, applies weight updates,
produces episode groups until stopped, and answers evals and rejection-sampling requests.
RolloutGroup (rollout_group.py) is the driver-side handle that spawns, feeds and restarts it.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import ray

from configs import JobConfig


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
        from physarum.logs import setup_service_logging

        setup_service_logging(job.resolved_run_dir, worker_id, job.logging.level)
        from buffer.store import EpisodeStore
        from physarum.services.network import pin_interface, serving_ip
        from rollout.worker import RolloutWorkerCore

        self.worker_id = worker_id
        if job.rollout.engine == "sglang":  # its weight-sync group runs gloo/NCCL from here
            pin_interface(serving_ip(job.rollout.sglang.host))
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
        # The model, torch, Ray and transformers leave ~300k long-lived objects that every
        # full collection walks again: one took ~130 ms of the event loop's thread (2 ms per
        # group on long_tail's workload). They live as long as the process, so out of the GC.
        gc.freeze()

    async def ready(self) -> bool:
        return await self.core.engine.health()

    async def where(self) -> dict[str, Any]:
        from models.device import resolve_device
        from physarum.services.nodes import where

        device = resolve_device(self.core.job.cluster.device, gpu_ids=ray.get_gpu_ids())
        return where("rollout", int(self.worker_id.rsplit("-", 1)[-1]), str(device))

    async def set_share(self, share: int) -> None:
        """Owe `share` groups per weight version from the current version on (a worker was
        lost or is back): the quota of past versions stays what it was."""
        producer = self.core.producer
        if producer is None or producer.plan.share == share:
            return
        plan = producer.plan
        ahead = producer.weight_version + plan.max_staleness + 1
        producer.stats.groups_pushed += ahead * (share - plan.share)
        plan.share = share
        producer.set_weight_version(producer.weight_version)  # wakes the loop: room changed

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
        """Stop production: generation is aborted and waits for buffer room are cancelled
        (RolloutProducer.stop), so it never waits on a trainer that has finished."""
        if self.core.producer is not None:
            self.core.producer.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def evaluate(
        self, rows: list[dict], k: int | None = None, temperature: float | None = None
    ) -> dict[str, float]:
        return await self.core.evaluate(rows, k=k, temperature=temperature)

    async def stats(self) -> dict[str, float]:
        return self.core.stats()

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
