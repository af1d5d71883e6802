"""Make a rank's share of a step ready for `train_step`: logprob passes, then advantages.

Backend-agnostic (any TrainerBackend; `values` only for a backend with a critic). The trainer
service hands every data-parallel rank its own share of the step (whole episode groups), so
the passes and group-based advantages are local; REINFORCE++'s whitening over the *global*
batch combines the ranks' moments through `all_reduce`.

  old logprobs   recomputed when `recompute_old` (several optimizer steps on this data, routing
                 replay, KL in the reward); otherwise train_step uses its own forward's
                 detached logprobs, which are the same numbers (the policy has not moved)
  ref logprobs   when the KL coefficient is > 0
  values         when the estimator needs a critic (gae)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from configs.algorithm import AlgorithmConfig
from trainer.backend import PackedBatch, TrainerBackend
from trainer.batch import StepBatch, from_padded, to_padded
from trainer.losses.advantages import NEEDS_VALUES, AdvantageInputs, AdvantageParams
from trainer.losses.kl import kl_penalty
from trainer.losses.registry import lookup

AllReduce = Callable[[Tensor, str], None]
"""all_reduce(tensor, op) in place over the data-parallel ranks, op "sum" | "max"."""


@dataclass(frozen=True)
class PassPlan:
    """Which model passes a step needs before the update."""

    old: bool
    ref: bool
    values: bool

    @classmethod
    def for_algorithm(cls, algo: AlgorithmConfig, *, ppo_epochs: int = 1) -> PassPlan:
        kl_in_reward = algo.kl.coef > 0 and algo.kl.mode == "reward"
        return cls(
            old=ppo_epochs > 1 or algo.moe.routing_replay != "none" or kl_in_reward,
            ref=algo.kl.coef > 0,
            values=algo.advantage in NEEDS_VALUES,
        )


def assign_advantages(
    step: StepBatch,
    algo: AlgorithmConfig,
    *,
    old_logprobs: list[Tensor] | None = None,
    ref_logprobs: list[Tensor] | None = None,
    values: list[Tensor] | None = None,
    eps: float = 1e-6,
    all_reduce: AllReduce | None = None,
) -> None:
    """Fill advantages (and returns, values) of every micro-batch of `step` in place.

    Per-token inputs are lists aligned with step.micro_batches. KL in the reward needs
    old_logprobs and ref_logprobs; gae needs values. all_reduce (over data-parallel ranks,
    each with its own step) makes batch-wide statistics (REINFORCE++ whitening) global.
    """
    batches, n, length = step.micro_batches, step.num_seqs, step.max_response_len
    mask = to_padded(batches, [b.loss_mask for b in batches], n, length)
    penalties = None
    if algo.kl.coef > 0 and algo.kl.mode == "reward":
        if old_logprobs is None or ref_logprobs is None:
            raise ValueError("kl.mode 'reward' needs old_logprobs and ref_logprobs")
        estimator = lookup("kl", algo.kl.estimator)
        per_token = [
            kl_penalty(o, r, b.loss_mask, algo.kl.coef, estimator)
            for o, r, b in zip(old_logprobs, ref_logprobs, batches, strict=True)
        ]
        penalties = to_padded(batches, per_token, n, length)
    padded_values = to_padded(batches, values, n, length) if values is not None else None
    inputs = AdvantageInputs(step.rewards, step.group_ids, mask, penalties, padded_values)
    params = AdvantageParams(gamma=algo.gamma, lam=algo.lam, eps=eps, all_reduce=all_reduce)
    result = lookup("advantage", algo.advantage)(inputs, params)
    for batch, adv in zip(batches, from_padded(batches, result.advantages), strict=True):
        batch.advantages = adv
    if result.returns is not None:
        for batch, ret in zip(batches, from_padded(batches, result.returns), strict=True):
            batch.returns = ret
    if values is not None:
        for batch, v in zip(batches, values, strict=True):
            batch.values = v


def prepare_step(
    backend: TrainerBackend,
    step: StepBatch,
    algo: AlgorithmConfig,
    *,
    ppo_epochs: int = 1,
    all_reduce: AllReduce | None = None,
) -> list[PackedBatch]:
    """This rank's micro-batches with old/ref logprobs, values and advantages filled."""
    plan = PassPlan.for_algorithm(algo, ppo_epochs=ppo_epochs)
    batches = step.micro_batches
    old = backend.logprobs(batches, model="actor") if plan.old else None
    ref = backend.logprobs(batches, model="ref") if plan.ref else None
    values = backend.values(batches) if plan.values else None  # type: ignore[attr-defined]
    for i, batch in enumerate(batches):
        batch.old_logprobs = old[i] if old is not None else batch.old_logprobs
        batch.ref_logprobs = ref[i] if ref is not None else batch.ref_logprobs
    assign_advantages(
        step, algo, old_logprobs=old, ref_logprobs=ref, values=values, all_reduce=all_reduce
    )
    return batches
