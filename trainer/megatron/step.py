"""From the trainer service's StepBatch to the micro-batches the megatron backend trains on.

The service hands each trainer rank its own share of a step (its own episode groups), as the
torch backend's data parallelism wants. Megatron ranks of one data-parallel replica (TP, PP
and CP peers) must see the same micro-batches, so the backend first all-gathers every rank's
StepBatch: their concatenation in rank order is the step, identical on every rank, which the
backend's schedule then splits over its DP ranks (inputs.dp_share).

The passes an algorithm needs before the update (old logprobs, reference logprobs; PassPlan)
run on the whole step, and advantages come from the shared `assign_advantages`, one gathered
StepBatch at a time (groups never straddle ranks' StepBatches).
"""

from __future__ import annotations

import torch.distributed as dist

from configs.algorithm import AlgorithmConfig
from trainer.backend import PackedBatch
from trainer.batch import StepBatch
from trainer.step_prep import PassPlan, assign_advantages


def gather_steps(step: StepBatch) -> list[StepBatch]:
    """Every rank's StepBatch, in rank order, on every rank."""
    world = dist.get_world_size()
    if world == 1:
        return [step]
    steps: list[StepBatch | None] = [None] * world
    dist.all_gather_object(steps, step)
    return [s for s in steps if s is not None and s.micro_batches]


def prepare_steps(backend, steps: list[StepBatch], algo: AlgorithmConfig, ppo_epochs: int):
    """All micro-batches of `steps` with old/ref logprobs and advantages filled."""
    plan = PassPlan.for_algorithm(algo, ppo_epochs=ppo_epochs)
    if plan.values:
        raise ValueError(
            f"algorithm.advantage {algo.advantage!r} needs a critic; the megatron backend has "
            "none (use grpo, dr_grpo, rloo or reinforce_pp, or trainer.backend: torch)"
        )
    batches: list[PackedBatch] = [b for s in steps for b in s.micro_batches]
    if plan.old:
        for batch, logp in zip(batches, backend.logprobs(batches, model="actor"), strict=True):
            batch.old_logprobs = logp
    if plan.ref:
        for batch, logp in zip(batches, backend.logprobs(batches, model="ref"), strict=True):
            batch.ref_logprobs = logp
    for s in steps:
        mine = s.micro_batches
        assign_advantages(
            s,
            algo,
            old_logprobs=[b.old_logprobs for b in mine] if plan.old else None,
            ref_logprobs=[b.ref_logprobs for b in mine] if plan.ref else None,
        )
    return batches
