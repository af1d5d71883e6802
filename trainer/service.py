"""The trainer service: one rank's loop body, between the buffer and a training backend.

An RL step takes this rank's share of episode groups within the staleness bound, trains,
bumps the version (rank 0 publishes it to the buffer) and remembers the groups, which are
acknowledged only once a checkpoint covering the step is on disk. SFT and rejection-sampling
steps feed Episodes built elsewhere. Nothing here knows about Ray; `physarum` wraps it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from buffer.episode import Episode, EpisodeGroup
from buffer.store import EpisodeStore
from configs import JobConfig
from models.checkpoint import from_pretrained, save_pretrained
from models.device import resolve_device
from models.weight_update import WeightUpdate
from trainer.batch import StepBatch, build_rl_step, build_step
from trainer.checkpoint_record import write_buffer_record, write_manifest
from trainer.distributed import DataParallel
from trainer.forensics import mismatch_path, top_mismatch, write_mismatch
from trainer.lora_export import save_lora_job
from trainer.prefix_tree import resolve_sharing
from trainer.torch_backend import TorchBackend
from trainer.trained_log import TrainedGroup, read_trained, write_trained

log = logging.getLogger(__name__)

CONSUMED_FILE = "consumed_groups.json"  # entry ids of the groups the checkpointed steps used
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class NoEpisodesError(TimeoutError):
    """The buffer delivered no episode group for too long: rollout is stuck or dead."""


def _torch_backend(
    job: JobConfig,
    model_dir: Path,
    dp: DataParallel,
    total_steps: int,
    policy_loss: str | None,
    device: torch.device,
) -> TorchBackend:
    model = from_pretrained(model_dir, dtype=_DTYPES[job.model.dtype], device=device)
    return TorchBackend(
        model,
        job.trainer,
        job.algorithm,
        seed=job.seed,
        total_steps=total_steps,
        dp=dp,
        policy_loss=policy_loss,
    )


def _megatron_backend(
    job: JobConfig,
    model_dir: Path,
    dp: DataParallel,
    total_steps: int,
    policy_loss: str | None,
    device: torch.device,
) -> Any:
    """megatron places its model itself (on the current CUDA device, or the CPU shim)."""
    from trainer.megatron.backend import build_megatron_backend

    return build_megatron_backend(job, model_dir, total_steps=total_steps, policy_loss=policy_loss)


BACKENDS: dict[str, Callable[..., Any]] = {"torch": _torch_backend, "megatron": _megatron_backend}


class TrainerService:
    """One trainer rank. `rank 0` also publishes versions and exports weights."""

    def __init__(
        self,
        job: JobConfig,
        model_dir: Path,
        *,
        store: EpisodeStore | None,
        total_steps: int,
        policy_loss: str | None = None,
        dp: DataParallel | None = None,
        device: torch.device | None = None,
    ) -> None:
        """device: where this rank computes; None = resolve job.cluster.device here (auto:
        the first GPU this process was given, e.g. by Ray through CUDA_VISIBLE_DEVICES)."""
        torch.set_num_threads(job.trainer.threads)
        self.job = job
        self._share_prefix = resolve_sharing(job)  # trainer.share_prompt_prefix, where exact
        self.device = device if device is not None else resolve_device(job.cluster.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives use the current device
        self.dp = dp or DataParallel()
        self.store = store
        self.consumer = f"trainer-{self.dp.rank}"
        self.backend = BACKENDS[job.trainer.backend](
            job, model_dir, self.dp, total_steps, policy_loss, self.device
        )
        self._pending: list[str] = []
        self._taken: list[tuple[str, str, int | None]] = []  # (entry, prompt, epoch) this step
        self._trained: list[TrainedGroup] = []  # since the last checkpoint (this rank)
        self._lineage: list[TrainedGroup] = []  # rank 0: what the checkpoints hold
        self._last_step_end = time.monotonic()
        self._export_cpu_s = 0.0  # this thread's CPU in the last weight_update (export)

    @property
    def version(self) -> int:
        return int(self.backend.version)

    @property
    def rank(self) -> int:
        return self.dp.rank

    def take_groups(self, n: int, timeout_s: float) -> list[EpisodeGroup]:
        """Block until n fresh groups arrived; NoEpisodesError after timeout_s without any."""
        assert self.store is not None, "take_groups needs a buffer"
        groups: list[EpisodeGroup] = []
        last_arrival = time.monotonic()
        while len(groups) < n:
            taken = self.store.take_groups(self.consumer, n - len(groups), block_ms=200)
            if taken:
                last_arrival = time.monotonic()
                self._pending.extend(t.entry_id for t in taken)
                self._taken.extend(
                    (t.entry_id, t.group.prompt_id, t.group.metadata.get("epoch")) for t in taken
                )
                groups.extend(t.group for t in taken)
            elif time.monotonic() - last_arrival > timeout_s:
                stats = self.store.stats()
                raise NoEpisodesError(
                    f"{self.consumer}: no episode group arrived for {timeout_s:.0f} s "
                    f"(have {len(groups)}/{n}; buffer: {stats})"
                )
        return groups

    def rl_step(self, timeout_s: float) -> dict[str, float]:
        """Take this rank's share of a step's groups, train on them, publish the version."""
        started, cpu_started = time.monotonic(), time.thread_time()
        between = started - self._last_step_end  # weight export, and any wait on the driver
        share = step_share(self.job.trainer.prompts_per_step, self.dp.rank, self.dp.world_size)
        groups = self.take_groups(share, timeout_s)
        waited = time.monotonic() - started
        cpu_taken = time.thread_time()
        mask_old = self.job.rollout.mask_offpolicy_tokens
        built = time.monotonic()
        step = build_rl_step(
            groups,
            micro_batch_tokens=self.job.trainer.micro_batch_tokens,
            temperature=self.job.rollout.temperature or 1.0,
            current_version=self.version,
            max_staleness=self.job.buffer.max_staleness if mask_old else None,
            mask_truncated=self.job.algorithm.overlong_filter,
            rollout_routing=self.job.algorithm.moe.routing_replay == "rollout",
            prompt_routing=self.job.algorithm.moe.replay_prompt_routing,
            share_prompt_prefix=self._share_prefix,
        )
        build_s = time.monotonic() - built
        cpu_built = time.thread_time()
        metrics = {f"train/{k}": v for k, v in self.backend.train(step).items()}
        trained, cpu_trained = time.monotonic(), time.thread_time()
        self._trained += [TrainedGroup(self.version, *taken) for taken in self._taken]
        self._taken = []
        self._save_mismatch(step)
        if self.rank == 0 and self.store is not None:
            self.store.set_version(self.version)
        metrics.update(_group_metrics(groups, self.version - 1))
        metrics["perf/wait_s"] = waited
        metrics["perf/build_s"] = build_s  # the step's micro-batches from the groups
        metrics["perf/after_train_s"] = time.monotonic() - trained  # forensics, version
        metrics["perf/between_steps_s"] = between
        metrics["perf/step_s"] = time.monotonic() - self._last_step_end
        # CPU of this thread (the one torch computes on with trainer.threads 1) by phase: on a
        # shared or saturated machine wall times include preemption, these do not
        cpu_end = time.thread_time()
        metrics["perf/cpu_take_s"] = cpu_taken - cpu_started  # buffer reads, decoding
        metrics["perf/cpu_build_s"] = cpu_built - cpu_taken
        metrics["perf/cpu_train_s"] = cpu_trained - cpu_built
        metrics["perf/cpu_after_train_s"] = cpu_end - cpu_trained
        metrics["perf/cpu_export_s"] = self._export_cpu_s  # the export before this step
        self._last_step_end = time.monotonic()
        return metrics

    def _save_mismatch(self, step: StepBatch) -> None:
        """This rank's top |Δlogprob| tokens of the step just trained (trainer/forensics.py)."""
        top = self.job.logging.mismatch_top
        if top <= 0:
            return
        records = top_mismatch(step.micro_batches, top)
        path = mismatch_path(self.job.resolved_run_dir, self.version, self.rank)
        write_mismatch(path, records)

    def sft_step(self, episodes: list[Episode]) -> dict[str, float]:
        """One optimizer step of cross-entropy under the loss mask."""
        step = build_step(
            episodes,
            list(range(len(episodes))),
            micro_batch_tokens=self.job.trainer.micro_batch_tokens,
        )
        metrics = {f"train/{k}": v for k, v in self.backend.train(step).items()}
        metrics["perf/step_s"] = time.monotonic() - self._last_step_end
        self._last_step_end = time.monotonic()
        return metrics

    def weight_update(self) -> WeightUpdate:
        """The current weights for the rollout workers. Casts and FP8 quantization run on
        this rank's device; the payload is host bytes because the update leaves this process
        (a Ray object; a CUDA tensor there would need a GPU wherever Ray deserializes it)."""
        rollout = self.job.rollout
        fp8_block = tuple(rollout.fp8_block) if rollout.fp8 else None
        cpu_started = time.thread_time()
        if self.job.trainer.lora is not None and rollout.engine == "sglang":
            # SGLang does not merge our adapters: the targeted weights go merged
            update = self.backend.weight_update(fp8_block=fp8_block, lora_merged=True)
        else:
            update = self.backend.weight_update(fp8_block=fp8_block)
        self._export_cpu_s = time.thread_time() - cpu_started
        return update

    def checkpoint(self, path: Path) -> None:
        """Save everything and mark it COMPLETE, then acknowledge the groups the saved steps
        consumed. Their entry ids are saved too: a crash between the marker and the ack is
        repaired by `restore`, so a group is neither lost (acked, but the checkpoint that
        used it incomplete) nor trained twice (checkpointed, but never acked)."""
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        consumed = self.dp.all_gather_object(list(self._pending))
        trained = self.dp.all_gather_object(list(self._trained))
        self._trained = []
        if self.rank == 0:
            ids = [entry for rank in consumed for entry in rank]
            (path / CONSUMED_FILE).write_text(json.dumps(ids))
            self._lineage += sorted((g for rank in trained for g in rank), key=lambda g: g.step)
            if self.store is not None:  # what a resume checks the buffer against
                write_trained(path, self._lineage)  # which groups the saved model has seen
                write_buffer_record(path, self.store.stats(), self.version, len(set(ids)))
            write_manifest(path)  # checksums: a corrupted checkpoint is never loaded
            (path / "COMPLETE").write_text(str(self.version))
        self.dp.barrier()  # no rank acks before the checkpoint is complete
        if self.store is not None and self._pending:
            self.store.ack(self._pending)
            self._pending = []
        log.info("%s: checkpoint at version %d -> %s", self.consumer, self.version, path)

    def restore(self, path: Path) -> None:
        self.backend.load(str(path))
        if self.rank == 0 and self.store is not None:
            # replayed (unacknowledged) groups are judged against the restored version
            self.store.set_version(self.version)
            self._lineage = read_trained(path) or []
            consumed = path / CONSUMED_FILE
            if consumed.exists():  # acks are idempotent: only a crash left any of these
                self.store.ack(json.loads(consumed.read_text()))
        self.dp.barrier()  # every rank takes groups only after the repair
        log.info("%s: restored version %d from %s", self.consumer, self.version, path)

    def save_hf(self, path: Path) -> None:
        """Write the current weights as an HF directory. Collective: call on every rank."""
        if getattr(self.backend, "lora", None) is not None:  # merged hf/ + PEFT adapter/
            if self.rank == 0:
                save_lora_job(self.backend.model, self.backend.lora, path)
            return
        backend_save = getattr(self.backend, "save_hf", None)
        if callable(backend_save):  # megatron: gathered across TP/EP/PP
            backend_save(path)
            return
        if not self.job.trainer.fsdp:
            if self.rank == 0:
                save_pretrained(self.backend.model, path)
            return
        named = self.backend.export_weights()  # FSDP: every rank takes part in the gather
        if self.rank != 0:
            for _ in named:
                pass
            return
        from models.glm4moe import Glm4MoeForCausalLM

        full = Glm4MoeForCausalLM(self.backend.model.config)
        full.load_hf_state_dict(named)
        save_pretrained(full, path)

    @property
    def collective_export(self) -> bool:
        """Whether every rank must take part in building a weight update."""
        return self.job.trainer.backend == "megatron" or self.job.trainer.fsdp


def step_share(total: int, rank: int, world_size: int) -> int:
    """This rank's groups of a step: an even split, the remainder to the lowest ranks."""
    return total // world_size + (rank < total % world_size)


def _group_metrics(groups: list[EpisodeGroup], train_version: int) -> dict[str, float]:
    episodes = [e for g in groups for e in g.episodes]
    rewards = [e.reward for e in episodes]
    stale = [train_version - v for g in groups if (v := g.oldest_version) is not None]
    lengths = [len(e.response_ids) for e in episodes]
    return {
        "reward": sum(rewards) / max(len(rewards), 1),
        "data/episodes": float(len(episodes)),
        "data/response_len": sum(lengths) / max(len(lengths), 1),
        "data/error_episodes": float(sum(e.is_error for e in episodes)),
        "buffer/staleness_mean": sum(stale) / max(len(stale), 1),
        "buffer/staleness_max": float(max(stale, default=0)),
    }
