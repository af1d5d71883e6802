"""Megatron's optimizer for the backend, on the torch backend's learning-rate schedule.

`get_megatron_optimizer` gives Adam (torch's AdamW without TE/Apex, TE's FusedAdam on GPUs)
over fp32 main parameters (bf16 training) with global-norm clipping, sharded over data
parallel ranks when the distributed optimizer is on, and optionally offloaded to the CPU
(`cpu_adam`, megatron's HybridDeviceOptimizer). Megatron exempts biases and 1-D parameters
(norms) from weight decay, where the torch backend decays every parameter.

The learning rate follows `trainer.optim.lr_multiplier` -- the torch backend's warmup + decay
-- set on every param group before each step, so both backends step with the same lr.
"""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from configs.services import TrainerConfig
from trainer.optim import DECAYS, lr_multiplier


def build_optimizer(model, trainer: TrainerConfig, config: TransformerConfig):
    """The MegatronOptimizer (a ChainedOptimizer) over a megatron-DDP-wrapped model."""
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=trainer.lr,
        min_lr=trainer.min_lr,
        weight_decay=trainer.weight_decay,
        adam_beta1=trainer.adam_beta1,
        adam_beta2=trainer.adam_beta2,
        adam_eps=trainer.adam_eps,
        clip_grad=trainer.grad_clip,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=trainer.megatron.distributed_optimizer,
        optimizer_cpu_offload=trainer.megatron.cpu_adam,
    )
    return get_megatron_optimizer(optimizer_config, [model])


def set_lr(optimizer, trainer: TrainerConfig, step: int, total_steps: int) -> float:
    """Set the lr of optimizer step `step` (0-based) on every param group; returns it."""
    lr = trainer.lr * lr_multiplier(
        step,
        warmup_steps=trainer.warmup_steps,
        total_steps=total_steps,
        decay=DECAYS[trainer.lr_schedule],
        min_ratio=trainer.min_lr / trainer.lr,
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
