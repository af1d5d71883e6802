"""The megatron-core TrainerBackend for GLM-4.x MoE (trainer/backend.py's protocol).

One instance per rank; torch.distributed must be initialised (gloo on a CPU, NCCL on GPUs,
with the CUDA device set) and every rank calls every method with the same arguments, except
`train(step)`, where each rank passes its own share of the step (step.py gathers them).
`logprobs` and `train_step` take the full list of micro-batches; each data-parallel rank
computes its share (inputs.py). Inside: megatron's GPTModel with the GLM-4.x spec (model.py,
spec.py), megatron DDP, megatron's (distributed) Adam on the torch backend's LR schedule
(optimizer.py), `get_forward_backward_func`'s schedule (1F1B under PP) and
`finalize_model_grads`, which also applies the loss-free balancing update of the router's
expert bias.

Loss: the trainer's shared `ActorObjective` (trainer/losses) on vocab-parallel logprobs
(logprobs.py). Its per-micro-batch results are shares of the step loss computed with
step-wide denominators, so the gradient must be their plain sum over micro-batches and DP
ranks: the config sets `calculate_per_token_loss` (no 1/num_microbatches, no DP averaging in
DDP) and our finalize hook passes no token count (no 1/num_tokens rescale).
The MoE auxiliary loss, when its coefficient is > 0, is megatron's own (applied per
micro-batch by the router), not the objective's.

The reference model for KL ("ref") is the initial weights kept on the CPU and swapped into
the actor for the logprob pass, as slime does, instead of a second model in device memory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from torch import Tensor

from configs.algorithm import AlgorithmConfig
from configs.services import TrainerConfig
from models.checkpoint import save_pretrained
from models.config import ModelConfig
from models.weight_update import WeightUpdate, build_weight_update
from trainer.backend import PackedBatch
from trainer.batch import StepBatch
from trainer.losses import ActorObjective, StatSums, StepTotals
from trainer.megatron import checkpoint, router_stats
from trainer.megatron.arch import GlmArch
from trainer.megatron.convert import names_key
from trainer.megatron.hf_checkpoint import LazyHFCheckpoint
from trainer.megatron.inputs import (
    MegatronInputs,
    broadcast_from_last_stage,
    dp_share,
    gather_dp,
    to_megatron_inputs,
)
from trainer.megatron.logprobs import packed_token_logprobs
from trainer.megatron.model import (
    build_model,
    check_plan,
    ensure_process_group,
    init_parallel,
    transformer_config,
)
from trainer.megatron.optimizer import build_optimizer, set_lr
from trainer.megatron.routing import Routing, gather_stages
from trainer.megatron.step import gather_steps, prepare_steps
from trainer.megatron.weights import export_hf_weights, load_hf_weights, named_tensors
from trainer.moe_balance import expert_load_metrics

if TYPE_CHECKING:
    from configs import JobConfig

log = logging.getLogger(__name__)

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class MegatronBackend:
    """TrainerBackend on megatron-core (see the module docstring)."""

    def __init__(
        self,
        model_config: Any,
        hf_weights: Mapping[str, Tensor],
        trainer: TrainerConfig,
        algo: AlgorithmConfig,
        *,
        policy_loss: str | None = None,
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        """model_config: HF-style GLM config (models.ModelConfig, transformers config, dict);
        hf_weights: the initial weights under HF names (a LazyHFCheckpoint, hf_state_dict());
        total_steps: the LR schedule's horizon (default trainer.steps)."""
        self.model_config, self.trainer, self.algo = model_config, trainer, algo
        self.arch = GlmArch.from_hf(model_config)
        par = trainer.megatron
        check_plan(self.arch, par, dist.get_world_size())
        init_parallel(par, seed)
        self.impl = "te" if par.transformer_engine else "local"  # the layer spec
        self.names = names_key(par.transformer_engine, par.grouped_gemm)  # its tensor names
        config = transformer_config(
            self.arch,
            par,
            dtype=trainer.dtype,
            bias_update_rate=algo.moe.bias_update_rate,
            aux_loss_coef=algo.moe.aux_loss_coef,
        )
        self.gpt = build_model(self.arch, config, self.impl)
        module = Float16Module(config, self.gpt) if config.bf16 else self.gpt
        for router in router_stats.routers(self.gpt):  # Float16Module cast it to bf16
            router.expert_bias.data = router.expert_bias.data.float()
        load_hf_weights(self.gpt, hf_weights, self.arch, self.names)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=par.distributed_optimizer
        )
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
        config.finalize_model_grads_func = self._finalize
        config.no_sync_func = self.model.no_sync
        self.optimizer = build_optimizer(self.model, trainer, config)
        self.total_steps = total_steps or trainer.steps
        self.objective = ActorObjective.from_config(algo, policy_loss)
        self._ref = _cpu_copy(self.gpt) if self.objective.needs_ref else None
        self._pad_multiple = par.tp
        sp = config.sequence_parallel
        self._sp_rank_size = (ps.get_tensor_model_parallel_rank(), par.tp) if sp else (0, 1)
        self._load_mask = router_stats.LoadMask(self.gpt, recompute=par.recompute)
        self._routing = (
            Routing(self.gpt, self.arch.moe_layer_pattern, par.recompute)
            if algo.moe.routing_replay != "none"
            else None
        )
        self._device = next(self.gpt.parameters()).device
        self._schedule = get_forward_backward_func()
        self._load = torch.zeros(0)
        self.version = 0

    # --- the TrainerBackend protocol ---------------------------------------------------------
    def logprobs(self, batches: list[PackedBatch], *, model: str = "actor") -> list[Tensor]:
        """No-grad per-token logprobs float32 [T] of every batch, on every rank. With routing
        replay, the actor's pass also sets each batch's `routed_experts`."""
        weights = {"actor": contextlib.nullcontext, "ref": self._ref_weights}
        if model not in weights:
            raise ValueError(f"model: expected one of {sorted(weights)}, got {model!r}")
        inputs = self._inputs(batches)
        results: list[Tensor] = []
        record = self._routing is not None and model == "actor"
        rollout = record and self.algo.moe.routing_replay == "rollout"  # R3: force, record
        routed: list[Tensor] = []

        def loss_func(item: MegatronInputs, output: Tensor):
            logp, _ = packed_token_logprobs(
                output[0], item.batch.input_ids, item.batch.cu_seqlens,
                temperature=item.batch.temperature,
            )  # fmt: skip
            results.append(logp.detach().float().cpu())
            return output.new_zeros(()), torch.tensor(1, dtype=torch.int), {}

        def after_forward(item: MegatronInputs) -> None:
            routed.append(self._routing.recorded(item))

        self.model.eval()
        with weights[model](), torch.no_grad():
            self._routing_mode("record" if record else None)
            self._run(
                inputs, loss_func, forward_only=True, after=after_forward if record else None,
                replay_record=rollout,
            )  # fmt: skip
            self._routing_mode(None)
        if record:
            for batch, experts in zip(batches, gather_dp(gather_stages(routed), len(batches))):
                batch.routed_experts = experts
        return gather_dp(broadcast_from_last_stage(results), len(batches))

    def train(self, step: StepBatch) -> dict[str, float]:
        """The trainer service's step: gather every rank's share, prepare, then
        trainer.ppo_epochs optimizer steps; returns the last step's metrics."""
        start = time.perf_counter()
        batches = self.prepare(step)
        metrics: dict[str, float] = {}
        for _ in range(self.trainer.ppo_epochs):
            metrics = self.train_step(batches)
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics

    def prepare(self, step: StepBatch) -> list[PackedBatch]:
        """Every rank's share of the step, with old/ref logprobs and advantages (step.py)."""
        return prepare_steps(self, gather_steps(step), self.algo, self.trainer.ppo_epochs)

    def train_step(
        self, batches: list[PackedBatch], *, loss: str | None = None
    ) -> dict[str, float]:
        """One optimizer step over the step's micro-batches; metrics identical on every rank.
        `loss` overrides the policy loss (e.g. "sft")."""
        start = time.perf_counter()
        objective = self.objective if loss is None else ActorObjective.from_config(self.algo, loss)
        inputs = self._inputs(batches)
        totals = self._totals(inputs, objective)
        stats = StatSums()

        def loss_func(item: MegatronInputs, output: Tensor):
            logp, entropy = packed_token_logprobs(
                output[0], item.batch.input_ids, item.batch.cu_seqlens,
                temperature=item.batch.temperature, with_entropy=True,
            )  # fmt: skip
            loss, batch_stats = objective(item.batch, logp, totals, entropy=entropy)
            stats.merge(batch_stats)  # fillers add zeros but keep the names equal on all ranks
            return loss, torch.tensor(1, dtype=torch.int), {}

        lr = set_lr(self.optimizer, self.trainer, self.version, self.total_steps)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._run(inputs, loss_func, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.version += 1
        metrics = self._step_metrics(stats)
        metrics.update(expert_load_metrics(router_stats.step_load(self._load)))
        metrics["moe/bias_abs_mean"] = router_stats.bias_abs_mean(self.gpt)
        elapsed = time.perf_counter() - start
        metrics.update(
            grad_norm=float(grad_norm or 0.0),
            lr=lr,
            tokens=float(totals.tokens),
            tokens_per_s=float(totals.tokens) / elapsed,
            version=float(self.version),
        )
        metrics["time/train_step_s"] = elapsed
        return metrics

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full tensors under HF names, gathered over TP/EP/PP; every rank must consume it.
        Unsplit tensors may be views of the live parameters: copy them before the next step."""
        return export_hf_weights(self.gpt, self.arch, self.names)

    def weight_update(
        self,
        version: int | None = None,
        *,
        fp8_block: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> WeightUpdate:
        """The weights as a versioned, bucketed update (trainer.weight_bucket_mb buckets);
        fp8_block quantises linear weights blockwise. Collective: call it on every rank."""
        return build_weight_update(
            self.export_weights(),
            self.version if version is None else version,
            bucket_bytes=self.trainer.weight_bucket_mb * 2**20,
            fp8_block=fp8_block,
            dtype=dtype or self.gpt.config.params_dtype,
        )

    def save_hf(self, path: str | Path) -> None:
        """An HF checkpoint directory of the current weights (rank 0 writes; collective)."""
        named = self.export_weights()
        if dist.get_rank() != 0:
            for _ in named:
                pass
            return
        config = self.model_config
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_hf_dict(dict(config))
        save_pretrained(_HFView(config, self.gpt.config.params_dtype, named), path)

    def save(self, path: str) -> None:
        checkpoint.save_checkpoint(path, self.gpt, self.optimizer, self.version)

    def load(self, path: str) -> None:
        self.version = checkpoint.load_checkpoint(path, self.gpt, self.optimizer)

    # --- internals -----------------------------------------------------------------------------
    def _inputs(self, batches: list[PackedBatch]) -> list[MegatronInputs]:
        return [
            to_megatron_inputs(batch, self._pad_multiple, self._device, filler)
            for batch, filler in dp_share(batches)
        ]

    def _routing_mode(self, mode: str | None) -> None:
        if self._routing is not None:
            self._routing.set_mode(mode)

    def _run(
        self, inputs: list[MegatronInputs], loss_func, *, forward_only: bool, after=None,
        replay_record: bool = False,
    ):  # fmt: skip
        """Megatron's schedule over `inputs`; `after(item)` runs after each forward;
        replay_record: force each batch's routed_experts and record (R3's logprob pass)."""
        replay = self._routing is not None and (not forward_only or replay_record)

        def forward_step(data_iterator, model):
            item = next(data_iterator)
            self._load_mask.first_excluded = item.first_padding_row(*self._sp_rank_size)
            if replay:
                self._routing.replay(item, *self._sp_rank_size, record=replay_record)
            output = model(item.input_ids, None, None, packed_seq_params=item.packed)
            if after is not None:
                after(item)
            return output, partial(loss_func, item)

        self._schedule(
            forward_step_func=forward_step,
            data_iterator=iter(inputs),
            model=[self.model],
            num_microbatches=len(inputs),
            seq_length=max(item.input_ids.shape[1] for item in inputs),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _totals(self, inputs: list[MegatronInputs], objective: ActorObjective) -> StepTotals:
        counts = torch.zeros(2, dtype=torch.float64, device=self._device)
        for item in inputs:
            counts[0] += objective.count(item.batch).double()
            counts[1] += 0 if item.filler else item.batch.num_tokens
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        return StepTotals(agg=counts[0].clamp_min(1.0).float(), tokens=counts[1].clamp_min(1.0))

    def _finalize(self, model, num_tokens=None, **kwargs) -> None:
        """finalize_model_grads without the 1/num_tokens rescale (see the module docstring);
        the routed-token counts are read first, since finalize consumes them."""
        self._load = router_stats.snapshot_load(self.gpt)
        finalize_model_grads(model, None, **kwargs)

    def _step_metrics(self, stats: StatSums) -> dict[str, float]:
        def reduce(tensor: Tensor, op: str) -> None:
            dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=ps.get_data_parallel_group())

        metrics = None
        if ps.is_pipeline_last_stage():
            stats.all_reduce(reduce)
            metrics = stats.finalize()
        return dict(broadcast_from_last_stage(metrics))

    @contextlib.contextmanager
    def _ref_weights(self):
        """Swap the reference weights into the model for the duration of the block."""
        if self._ref is None:
            raise ValueError("model 'ref': no reference model (algorithm.kl.coef is 0)")
        actor = _cpu_copy(self.gpt)
        _copy_into(self.gpt, self._ref)
        try:
            yield
        finally:
            _copy_into(self.gpt, actor)


def _cpu_copy(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in named_tensors(model).items()}


@torch.no_grad()
def _copy_into(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    for name, tensor in named_tensors(model).items():
        tensor.copy_(state[name])


class _HFView:
    """What models.checkpoint.save_pretrained reads from a model: config, dtype, no FP8
    modules, and the HF-named tensors (here: the export stream)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, named) -> None:
        self.config, self.dtype, self._named = config, dtype, named

    def modules(self) -> Iterator[torch.nn.Module]:
        return iter(())

    def hf_state_dict(self) -> Iterator[tuple[str, Tensor]]:
        return self._named


def build_megatron_backend(
    job: JobConfig,
    model_dir: str | Path,
    *,
    total_steps: int | None = None,
    policy_loss: str | None = None,
) -> MegatronBackend:
    """The trainer service's factory: the run's initial HF checkpoint in `model_dir` (the same
    weights the torch backend and the rollout engines start from), read lazily per rank."""
    ensure_process_group()
    return MegatronBackend(
        ModelConfig.load(model_dir),
        LazyHFCheckpoint(model_dir),
        job.trainer,
        job.algorithm,
        policy_loss=policy_loss,
        seed=job.seed,
        total_steps=total_steps,
    )
