"""The trainer group: one Ray actor per rank, torch.distributed among them (gloo on CPU).

Rank 0 publishes versions to the buffer and exports weights. Every call fans out to all
ranks and returns rank 0's answer (metrics are already reduced across ranks by the backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from configs import JobConfig
from physarum.cluster import actor_options
from physarum.services.trainer_start import bundle_nodes, check_lost, join_group

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
        bind_ip: str | None,
        store_url: str | None,
        total_steps: int,
        policy_loss: str | None,
    ) -> None:
        """Light on purpose: the driver asks rank 0 for its address first (`address`), then
        every rank joins (`join`) and builds its model (`build`)."""
        from physarum.logs import setup_service_logging
        from trainer.host_memory import retain_freed_memory

        setup_service_logging(job.resolved_run_dir, f"trainer-{rank}", job.logging.level)
        retain_freed_memory()  # this process only: a step's activations reuse freed pages
        from models.device import resolve_device
        from physarum.services.network import serving_ip

        self.job, self.model_dir, self.rank, self.world_size = job, model_dir, rank, world_size
        self.store_url, self.total_steps, self.policy_loss = store_url, total_steps, policy_loss
        self.ip = serving_ip(bind_ip)
        self.device = resolve_device(job.cluster.device, gpu_ids=ray.get_gpu_ids())
        self._service: Any = None
        self._failed: BaseException | None = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a port free on it: where rank 0 hosts the rendezvous."""
        from physarum.services.network import free_port

        return self.ip, free_port(self.ip)

    def where(self) -> dict[str, Any]:
        from physarum.services.nodes import where

        return where("trainer", self.rank, str(self.device))

    def join(self, master: tuple[str, int], timeout_s: float) -> list[int]:
        """Join torch.distributed (NCCL on CUDA, gloo on the CPU) over this node's interface;
        rank 0 returns the ranks that did not arrive within `timeout_s`."""
        from models.device import dist_backend
        from physarum.services.network import pin_interface
        from physarum.services.rendezvous import join

        pin_interface(self.ip)
        if self.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.device)  # NCCL binds the current device at init
        return join(
            master,
            rank=self.rank,
            world_size=self.world_size,
            backend=dist_backend(self.device),
            timeout_s=timeout_s,
            node_ip=self.ip,
        )

    def build(self) -> None:
        """Load the model and optimizer (after `join` when there are several ranks)."""
        from buffer.store import EpisodeStore
        from trainer.distributed import DataParallel
        from trainer.service import TrainerService

        job = self.job
        dp = DataParallel(rank=self.rank, world_size=self.world_size)
        store = (
            EpisodeStore.from_config(self.store_url, job.buffer_namespace, job.buffer)
            if self.store_url
            else None
        )
        try:
            self._service = TrainerService(
                job,
                Path(self.model_dir),
                store=store,
                total_steps=self.total_steps,
                policy_loss=self.policy_loss,
                dp=dp,
                device=self.device,
            )
        except BaseException as exc:
            self._failed = exc
            raise

    @property
    def service(self) -> Any:
        if self._service is None:
            raise RuntimeError(
                f"trainer rank {self.rank} has no model: its start-up failed ({self._failed!r})"
            )
        return self._service

    def version(self) -> int:
        return self.service.version

    @ray.method(num_returns=2)
    def rl_step_export(self, timeout_s: float, export: bool) -> tuple[dict[str, float], Any]:
        """rl_step, then (export) the weights it produced: one actor call where the loop
        would queue two back to back (each call costs this process Ray's own CPU: receiving
        the task, storing its results)."""
        metrics = self.service.rl_step(timeout_s)
        return metrics, self.service.weight_update() if export else None

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


class TrainerStalledError(TimeoutError):
    """A trainer rank did not answer within its timeout."""


@dataclass
class QueuedStep:
    """A submitted RL step: every rank's metrics ref, and the ref of the WeightUpdate it
    ends with (rank 0's; None when the step was submitted without its export)."""

    metrics: list[ray.ObjectRef]
    update: ray.ObjectRef | None


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
        bind_ip: str | None = None,
    ) -> None:
        """bind_ip: the rendezvous address (127.0.0.1 on an embedded Ray); None = the IP of
        rank 0's node."""
        self.job = job
        world = job.trainer.num_ranks
        options = actor_options(
            job.cluster.trainer_cpus, job.cluster.trainer_gpus, threads=job.trainer.threads
        )
        self.actors = []
        for rank in range(world):
            strategy = placement.bundle(f"trainer-{rank}") if placement else {}
            actor = TrainerActor.options(name=None, **options, **strategy).remote(
                job,
                str(model_dir),
                rank=rank,
                world_size=world,
                bind_ip=bind_ip,
                store_url=store_url,
                total_steps=total_steps,
                policy_loss=policy_loss,
            )
            self.actors.append(actor)
        self.rank0 = self.actors[0]
        self.collective_export = job.trainer.backend == "megatron" or job.trainer.fsdp
        self.nodes = bundle_nodes(world, placement)  # rank -> node IP, for error messages
        if world > 1:  # waits for the ranks' processes, not for their models
            self.nodes = join_group(self.actors, job.cluster.rendezvous_timeout_s, placement)
        for actor in self.actors:  # in order before any later call; the first call waits
            actor.build.remote()
        log.info("trainer: starting %d rank(s) (%s backend)", world, job.trainer.backend)

    def _all(self, method: str, *args: Any) -> Any:
        """Call `method` on every rank, bounded by checkpoint.timeout_s; rank 0's answer."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        timeout = self.job.checkpoint.timeout_s
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            silent = [rank for rank, ref in enumerate(refs) if ref not in ready]
            raise TrainerStalledError(
                f"trainer: rank(s) {silent} did not finish {method} within {timeout:.0f} s "
                "(checkpoint.timeout_s)"
            )
        check_lost(self.actors, refs, ready, self.job, self.nodes)  # a dead rank: --resume
        return ray.get(refs)[0]

    def rl_step(self, timeout_s: float, *, while_waiting: Any = None) -> dict[str, float]:
        """One RL step on every rank; `while_waiting()` runs every half second until it is
        done (the driver restarts dead rollout workers meanwhile, or the step would starve)."""
        queued = self.submit_rl_step(timeout_s, export=False)
        return self.rl_step_result(queued, while_waiting=while_waiting)

    def submit_rl_step(self, timeout_s: float, *, export: bool = True) -> QueuedStep:
        """Queue one RL step on every rank and return at once; `export`: the step's own call
        then builds the weight update of its result (what `weight_update_ref` would, on the
        same ranks). A rank runs its calls in the order they were submitted, so the next
        step, queued behind, starts the moment this one's export is done, while the driver
        logs, evaluates or pushes weights."""
        pairs = [
            a.rl_step_export.remote(timeout_s, export and (rank == 0 or self.collective_export))
            for rank, a in enumerate(self.actors)
        ]
        return QueuedStep([m for m, _ in pairs], pairs[0][1] if export else None)

    def rl_step_result(self, queued: QueuedStep, *, while_waiting: Any = None) -> dict[str, float]:
        """Wait for a submitted step (see `rl_step`); rank 0's metrics."""
        refs = queued.metrics
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            check_lost(self.actors, refs, ready, self.job, self.nodes)  # others would hang
            if len(ready) == len(refs):
                break
            if while_waiting is not None:
                while_waiting()
        return ray.get(refs)[0]

    def where(self) -> list[dict[str, Any]]:
        """placement.json rows of every rank."""
        rows = ray.get([a.where.remote() for a in self.actors])
        self.nodes = {row["rank"]: row["node_ip"] for row in rows}
        return rows

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
