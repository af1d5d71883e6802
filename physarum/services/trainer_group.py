"""The trainer group: one Ray actor per rank, torch.distributed among them (gloo on CPU).

Rank 0 publishes versions to the buffer and exports weights. Every call fans out to all
ranks and returns rank 0's answer (metrics are already reduced across ranks by the backend).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from configs import JobConfig
from physarum.cluster import actor_options

log = logging.getLogger(__name__)


@ray.remote
class TrainerActor:
    """One trainer rank around trainer.service.TrainerService."""

    def __init__(
        self,
        job: JobConfig,
        model_dir: str,
        *,
        rank: int,
        world_size: int,
        master: tuple[str, int],
        store_url: str | None,
        total_steps: int,
        policy_loss: str | None,
    ) -> None:
        logging.basicConfig(
            level=job.logging.level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s"
        )
        from buffer.store import EpisodeStore
        from trainer.distributed import DataParallel
        from trainer.service import TrainerService

        dp = DataParallel()
        if world_size > 1:
            import torch.distributed as dist

            os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            dp = DataParallel(rank=rank, world_size=world_size)
        store = (
            EpisodeStore.from_config(store_url, job.buffer_namespace, job.buffer)
            if store_url
            else None
        )
        self.service = TrainerService(
            job,
            Path(model_dir),
            store=store,
            total_steps=total_steps,
            policy_loss=policy_loss,
            dp=dp,
        )

    def version(self) -> int:
        return self.service.version

    def rl_step(self, timeout_s: float) -> dict[str, float]:
        return self.service.rl_step(timeout_s)

    def sft_step(self, episodes: list) -> dict[str, float]:
        return self.service.sft_step(episodes)

    def weight_update(self) -> Any:
        return self.service.weight_update()

    def checkpoint(self, path: str) -> None:
        self.service.checkpoint(Path(path))

    def restore(self, path: str) -> int:
        self.service.restore(Path(path))
        return self.service.version

    def save_hf(self, path: str) -> None:
        self.service.save_hf(Path(path))


class TrainerGroup:
    """Handle on all trainer ranks."""

    def __init__(
        self,
        job: JobConfig,
        model_dir: Path,
        *,
        store_url: str | None,
        total_steps: int,
        policy_loss: str | None = None,
        placement: Any = None,
    ) -> None:
        from physarum.api import free_port

        world = job.trainer.num_ranks
        options = actor_options(
            job.cluster.trainer_cpus, job.cluster.trainer_gpus, threads=job.trainer.threads
        )
        master = ("127.0.0.1", free_port())
        self.actors = []
        for rank in range(world):
            strategy = placement.bundle(f"trainer-{rank}") if placement else {}
            actor = TrainerActor.options(name=None, **options, **strategy).remote(
                job,
                str(model_dir),
                rank=rank,
                world_size=world,
                master=master,
                store_url=store_url,
                total_steps=total_steps,
                policy_loss=policy_loss,
            )
            self.actors.append(actor)
        self.rank0 = self.actors[0]
        self.collective_export = job.trainer.backend == "megatron" or job.trainer.fsdp
        # No wait here: actors start in parallel with the rollout; the first call waits.
        log.info("trainer: starting %d rank(s) (%s backend)", world, job.trainer.backend)

    def _all(self, method: str, *args: Any) -> Any:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])[0]

    def rl_step(self, timeout_s: float, *, while_waiting: Any = None) -> dict[str, float]:
        """One RL step on every rank; `while_waiting()` runs every half second until it is
        done (the driver restarts dead rollout workers meanwhile, or the step would starve)."""
        refs = [a.rl_step.remote(timeout_s) for a in self.actors]
        while while_waiting is not None:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            if len(ready) == len(refs):
                break
            while_waiting()
        return ray.get(refs)[0]

    def sft_step(self, episodes: list) -> dict[str, float]:
        return ray.get(self.sft_step_async(episodes))

    def sft_step_async(self, episodes: list) -> ray.ObjectRef:
        """Start an SFT step on every rank (each gets its shard); the ref is rank 0's metrics."""
        shards = [episodes[r :: len(self.actors)] for r in range(len(self.actors))]
        refs = [a.sft_step.remote(s) for a, s in zip(self.actors, shards, strict=True)]
        return refs[0]

    def weight_update_ref(self) -> ray.ObjectRef:
        """An object ref to rank 0's WeightUpdate, shared by every rollout worker. Backends
        whose export is collective (megatron's gathers, FSDP) build it on every rank."""
        if self.collective_export:
            return [a.weight_update.remote() for a in self.actors][0]
        return self.rank0.weight_update.remote()

    def version(self) -> int:
        return ray.get(self.rank0.version.remote())

    def checkpoint(self, path: Path) -> None:
        self._all("checkpoint", str(path))

    def restore(self, path: Path) -> int:
        return self._all("restore", str(path))

    def save_hf(self, path: Path) -> None:
        self._all("save_hf", str(path))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
