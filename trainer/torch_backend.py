"""The plain-torch training backend: our GLM-4.x MoE model, AdamW, data parallel over gloo/NCCL.

One `TorchBackend` per trainer rank. `train_step` is one optimizer step over this rank's
micro-batches with gradient accumulation; losses come from the shared objective
(trainer/losses/objective.py), scaled by step-wide denominators so that the gradient summed
over micro-batches and ranks is exactly the global batch's. After the step: gradient clipping,
AdamW, the LR schedule, loss-free MoE balancing from the step's expert load, version + 1.

PPO: a critic (`ValueModel`, the actor's architecture + a value head, its own AdamW at
critic_lr) is built when the advantage estimator needs values; a frozen reference copy of the
initial actor when kl.coef > 0. Routing replay: the actor's logprob pass captures each
micro-batch's experts (PackedBatch.routed_experts) and training replays them; with routing
replay `rollout` (R3) that pass first forces the engine's experts the batch brought (rows of -1,
the prompt by default, keep the router's own choice).

Devices: everything runs on the model's device (`models.device.resolve_device` picks it;
the caller moves the model there before building the backend). Micro-batches are built on
the CPU and moved to the device right before each forward; the per-token results of the
no-grad passes (old/ref logprobs, values) come back to the CPU, where the step's advantages
are computed. On CUDA the forwards run under bf16 autocast whatever trainer.dtype says
(fp32 master weights and optimizer state stay in the model's dtype).

trainer.dtype bfloat16 on the CPU is the same mixed precision: autocast, plus the two places
it does not reach computing in bf16 by hand (the routed experts' grouped GEMMs, models/moe.py;
lm_head's chunked logprob backward, models/logprobs.py); logprobs for the loss are fp32.
Weight updates and checkpoints: trainer/torch_state.py.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from configs.algorithm import AlgorithmConfig
from configs.services import TrainerConfig
from models.glm4moe import Glm4MoeForCausalLM
from models.moe import RoutingCapture, RoutingReplay
from models.weight_update import WeightUpdate
from trainer import mixed_precision, torch_state
from trainer.backend import PackedBatch
from trainer.batch import StepBatch
from trainer.checkpoint import seed_everything
from trainer.critic import ValueModel
from trainer.distributed import DataParallel
from trainer.export_plan import ExportPlan
from trainer.forward import mtp_token_loss, trainable_logprobs
from trainer.fsdp import shard_actor, to_float
from trainer.lora_backend import AdapterFreeReference, setup_lora
from trainer.losses.advantages import NEEDS_VALUES
from trainer.losses.objective import ActorObjective, CriticObjective, StepTotals
from trainer.losses.stats import StatSums
from trainer.mixed_precision import Bf16Weights
from trainer.moe_balance import update_expert_bias
from trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, trained_params
from trainer.step_metrics import reduce_stats, step_metrics
from trainer.step_prep import prepare_step

log = logging.getLogger(__name__)


def _inert_batch() -> PackedBatch:
    """A 2-token micro-batch with nothing to train (keeps FSDP ranks in step)."""
    zeros = torch.zeros(2)
    return PackedBatch(
        input_ids=torch.zeros(2, dtype=torch.long),
        cu_seqlens=torch.tensor([0, 2]),
        loss_mask=zeros,
        rollout_logprobs=zeros,
        advantages=zeros,
        versions=torch.full((2,), -1),
        seq_ids=torch.zeros(2, dtype=torch.long),
    )


def _no_layout(b: PackedBatch) -> None:
    """The critic runs unshared rows (the service never shares prompts with a critic)."""
    if b.layout is not None:
        raise ValueError(
            "trainer.share_prompt_prefix: the critic (advantage gae) needs unshared rows"
        )


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


class TorchBackend:
    """TrainerBackend over a Glm4MoeForCausalLM (see the module docstring)."""

    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        cfg: TrainerConfig,
        algo: AlgorithmConfig,
        *,
        seed: int = 0,
        total_steps: int | None = None,
        dp: DataParallel | None = None,
        policy_loss: str | None = None,
    ) -> None:
        """policy_loss overrides algo.policy_loss (e.g. "sft" for SFT and rejection sampling);
        total_steps is the LR schedule's horizon (default cfg.steps)."""
        self.cfg, self.algo = cfg, algo
        self.dp = dp or DataParallel()
        seed_everything(seed + self.dp.rank)
        self.model = model
        self.dp.broadcast_module(model)
        self.lora = setup_lora(model, cfg, self.dp)  # None = full fine-tuning
        self.objective = ActorObjective.from_config(algo, policy_loss)
        needs_copy = self.objective.needs_ref and self.lora is None  # LoRA: adapters off
        self.ref = _frozen_copy(model) if needs_copy else None
        self.critic: ValueModel | None = None
        if algo.advantage in NEEDS_VALUES and not self.objective.is_sft:
            self.critic = ValueModel.from_actor(model)
            self.critic_objective = CriticObjective.from_config(algo)
            self.critic_optimizer = build_optimizer(self.critic.parameters(), cfg, cfg.critic_lr)
            self.critic_scheduler = build_scheduler(self.critic_optimizer, cfg, total_steps)
        self._train_mtp = self._check_mtp(model, cfg)
        self._fsdp_units = shard_actor(model) if cfg.fsdp and self.dp.enabled else None
        if cfg.fsdp and not self.dp.enabled:
            log.info("trainer.fsdp: one rank, nothing to shard; training unsharded")
        self._loss_scale = float(self.dp.world_size) if self._fsdp_units else 1.0
        self.optimizer = build_optimizer(
            self._trainable.parameters(), cfg, cfg.lr, fused=self._fsdp_units is None
        )
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.version = 0
        self._hf_views = torch_state.HfViews()  # the export's name -> view list, kept
        self._export_plan = ExportPlan()  # and its bucket layout (trainer/export_plan.py)
        self.device = model.device
        self._autocast_dtype = mixed_precision.compute_dtype(cfg.dtype, self.device)
        # CPU bf16: one bf16 copy of the matmul weights per optimizer step (mixed_precision.py)
        plain = self.device.type == "cpu" and self.lora is None and self._fsdp_units is None
        self._bf16_weights = (
            Bf16Weights(model, self.optimizer) if plain and self._autocast_dtype else None
        )

    @property
    def _trainable(self) -> nn.Module:
        """What the actor's optimizer trains and checkpoints save: the adapters under LoRA."""
        return self.lora if self.lora is not None else self.model

    def _check_mtp(self, model: Glm4MoeForCausalLM, cfg: TrainerConfig) -> bool:
        """Whether SFT trains the MTP layers (trainer.mtp_loss_weight > 0); else freeze them."""
        if cfg.mtp_loss_weight == 0 or not self.objective.is_sft:
            model.mtp.requires_grad_(False)
            return False
        if not len(model.mtp):
            raise ValueError(
                f"trainer.mtp_loss_weight={cfg.mtp_loss_weight}: the model has no MTP layer "
                "(its config.json has num_nextn_predict_layers=0); set it to 0"
            )
        if cfg.fsdp and self.dp.enabled:
            raise ValueError("trainer.mtp_loss_weight > 0 is not supported with trainer.fsdp")
        return True

    # --- model passes ------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        device_type = self.model.device.type
        return mixed_precision.autocast(self._autocast_dtype, device_type, self._bf16_weights)

    def _on_device(self, b: PackedBatch) -> PackedBatch:
        """b with its tensors on the model's device (b itself on the CPU)."""
        return b if self.device.type == "cpu" else b.to(self.device)

    def _network(self, name: str) -> nn.Module:
        ref = self.ref if self.lora is None else AdapterFreeReference(self.model, self.lora)
        networks = {"actor": self.model, "ref": ref if self.objective.needs_ref else None}
        if networks.get(name) is None:
            valid = sorted(k for k, v in networks.items() if v is not None)
            raise ValueError(f"model: {name!r} is not available; valid: {valid}")
        return networks[name]

    @torch.no_grad()
    def logprobs(self, batches: list[PackedBatch], *, model: str = "actor") -> list[Tensor]:
        """float32 [T] per batch. The actor's pass records routing when routing replay is on."""
        network = self._network(model)
        mode = self.algo.moe.routing_replay if network is self.model else "none"
        capture = mode != "none"
        outs = []
        for b, real in self._aligned(batches, sharded=network is self.model):
            routing = RoutingCapture() if capture else None
            if mode == "rollout" and b.routed_experts is not None:
                routing = RoutingReplay(b.routed_experts.to(self.device))
            on_device = self._on_device(b)
            with self._autocast():
                out = network.token_logprobs(
                    on_device.input_ids,
                    on_device.cu_seqlens,
                    temperature=b.temperature,
                    chunk_size=self.cfg.logprob_chunk,
                    routing=routing,
                    layout=on_device.layout,
                )
            if capture:
                b.routed_experts = out.routed_experts
            if real:
                outs.append(out.logprobs.float().cpu())
        return outs

    def _aligned(self, batches: list[PackedBatch], *, sharded: bool = True) -> list[tuple]:
        """(batch, is_real) pairs; under FSDP every rank runs as many micro-batches as the
        busiest one (its collectives must match), padded with an inert 2-token batch."""
        pairs = [(b, True) for b in batches]
        if not (sharded and self._fsdp_units):
            return pairs
        count = torch.tensor([float(len(batches))])
        self.dp.all_reduce(count, "max")
        return pairs + [(_inert_batch(), False)] * (int(count) - len(batches))

    @torch.no_grad()
    def values(self, batches: list[PackedBatch]) -> list[Tensor]:
        """Critic values float32 [T] per batch (aligned like logprobs)."""
        if self.critic is None:
            raise ValueError("values: this backend has no critic (advantage is not 'gae')")
        outs = []
        for b in batches:
            _no_layout(b)
            on_device = self._on_device(b)
            with self._autocast():
                values = self.critic.values(on_device.input_ids, on_device.cu_seqlens)
            outs.append(values.float().cpu())
        return outs

    # --- training ----------------------------------------------------------------------------
    def prepare(self, step: StepBatch) -> list[PackedBatch]:
        """This rank's share of a step (its own groups) with the passes and advantages the
        algorithm needs; REINFORCE++ whitening is global over the ranks. SFT needs none."""
        if self.objective.is_sft:
            return step.micro_batches
        return prepare_step(
            self, step, self.algo, ppo_epochs=self.cfg.ppo_epochs, all_reduce=self.dp.all_reduce
        )

    def train(self, step: StepBatch) -> dict[str, float]:
        """The trainer service's step, `step` being this rank's share (its own episode
        groups): prepare, then cfg.ppo_epochs optimizer steps; the last step's metrics."""
        t0 = time.perf_counter()
        batches = self.prepare(step)
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.ppo_epochs):
            metrics = self.train_step(batches)
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def _totals(self, batches: list[PackedBatch], counter: Any) -> StepTotals:
        local = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            local[0] += counter(b)
            local[1] += b.num_tokens
        self.dp.all_reduce(local)
        local = local.to(self.device)
        return StepTotals(agg=local[0].clamp_min(1.0).float(), tokens=local[1].clamp_min(1.0))

    def _train_forward(self, b: PackedBatch, routing: RoutingReplay | None) -> Any:
        """Differentiable logprobs/entropy (+ expert load, aux loss) of the actor on b."""
        if self._fsdp_units:  # FSDP gathers the weights around its registered token_logprobs
            return self.model.token_logprobs(
                b.input_ids, b.cu_seqlens, temperature=b.temperature, with_entropy=True,
                chunk_size=self.cfg.logprob_chunk, routing=routing, layout=b.layout,
            )  # fmt: skip
        return trainable_logprobs(
            self.model, b, chunk_size=self.cfg.logprob_chunk, routing=routing,
            full_hidden=self._train_mtp,  # the MTP loss reads every row of the trunk's output
        )  # fmt: skip

    def _actor_pass(
        self, batches: list[PackedBatch], objective: ActorObjective
    ) -> tuple[StatSums, Tensor]:
        totals = self._totals(batches, objective.count)
        stats: StatSums | None = None
        load = torch.zeros(
            len(self.model.moe_blocks()), self.model.config.n_routed_experts, device=self.device
        )
        replay = self.algo.moe.routing_replay != "none"
        for orig, real in self._aligned(batches):
            b = self._on_device(orig)
            routing = (
                RoutingReplay(b.routed_experts) if replay and b.routed_experts is not None else None
            )
            with self._autocast():
                out = self._train_forward(b, routing)
            loss, part = objective(
                b, out.logprobs, totals, entropy=out.entropy, aux_loss=out.aux_loss
            )
            if self._train_mtp and objective.is_sft:
                loss = loss + self._mtp_loss(b, out.hidden, totals, part)
            (loss * self._loss_scale).backward()
            if real:  # train_logprobs: what the mismatch forensics read (no logprob pass)
                orig.train_logprobs = out.logprobs.detach().float().cpu()
                load += out.expert_load.detach().float()
                if stats is None:  # the first part is the running sums: no copy to merge
                    stats = part
                else:
                    stats.merge(part)
        return (stats if stats is not None else StatSums()), load

    def _mtp_loss(
        self, b: PackedBatch, hidden: Tensor, totals: StepTotals, stats: StatSums
    ) -> Tensor:
        """weight * the MTP cross-entropy summed over b, over the step's loss denominator."""
        with self._autocast():
            total, count = mtp_token_loss(self.model, b, hidden, chunk_size=self.cfg.logprob_chunk)
        share = self.cfg.mtp_loss_weight * total / totals.agg
        stats.add_sum("mtp_loss", share)
        stats.add_mean("mtp_ce", total, count)
        return share

    def _critic_pass(self, batches: list[PackedBatch]) -> StatSums:
        totals = self._totals(batches, self.critic_objective.count)
        stats = StatSums()
        for b in batches:
            _no_layout(b)
            b = self._on_device(b)
            with self._autocast():
                values = self.critic.values(b.input_ids, b.cu_seqlens)
            loss, part = self.critic_objective(b, values.float(), totals)
            loss.backward()
            stats.merge(part)
        return stats

    def _optimizer_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> float:
        params = trained_params(optimizer)  # module's trainable parameters, in order
        if not (self._fsdp_units and module is self.model):  # FSDP reduced them already
            self.dp.all_reduce_grads(params)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = clip_grad_norm(params, max_norm)
        optimizer.step()
        scheduler.step()
        return to_float(norm)

    def train_step(
        self, batches: list[PackedBatch], *, loss: str | None = None
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; `loss` overrides the policy loss."""
        t0 = time.perf_counter()
        objective = self.objective if loss is None else ActorObjective.from_config(self.algo, loss)
        lr = self.scheduler.get_last_lr()[0]
        if not self.model.training:  # train() walks every module: only when it changes
            self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats, load = self._actor_pass(batches, objective)
        grad_norm = self._optimizer_step(self._trainable, self.optimizer, self.scheduler)
        metrics = {"grad_norm": grad_norm, "lr": lr}
        if self.critic is not None and not objective.is_sft:
            self.critic_optimizer.zero_grad(set_to_none=True)
            stats.merge(self._critic_pass(batches))
            metrics["critic/grad_norm"] = self._optimizer_step(
                self.critic, self.critic_optimizer, self.critic_scheduler
            )
        reduce_stats(stats, self.dp)
        self.dp.all_reduce(load)
        if self.lora is None:  # under LoRA the router's bias is frozen base (lora_backend.py)
            update_expert_bias(self.model.moe_blocks(), load, self.algo.moe.bias_update_rate)
        self.version += 1
        elapsed = time.perf_counter() - t0
        metrics |= step_metrics(batches, stats, load, self.dp, elapsed)
        metrics |= {"version": float(self.version), "time/train_step_s": elapsed}
        return metrics

    # --- weights and checkpoints (trainer/torch_state.py) -------------------------------------
    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The actor's full tensors with Hugging Face names (see torch_state.export_weights)."""
        return torch_state.export_weights(self.model, self._fsdp_units, self._hf_views)

    def weight_update(
        self,
        version: int | None = None,
        *,
        fp8_block: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        lora_merged: bool = False,
    ) -> WeightUpdate:
        """The actor's weights as a versioned, bucketed update (torch_state.weight_update)."""
        return torch_state.weight_update(
            self, self.version if version is None else version, fp8_block=fp8_block,
            dtype=dtype, device=device, lora_merged=lora_merged,
        )  # fmt: skip

    def save(self, path: str) -> None:
        """Model, optimizer, scheduler (+ critic, reference), RNG, version into directory path.
        Every rank must call it (rank 0 writes the state, each rank its RNG state)."""
        torch_state.save(self, path)

    def load(self, path: str) -> None:
        """Restore everything `save` wrote; the components must match (same algorithm)."""
        torch_state.load(self, path)
