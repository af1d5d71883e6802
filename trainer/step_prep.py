"""Make a step's micro-batches ready for `train_step`: shard, logprob passes, advantages.

Backend-agnostic (any TrainerBackend; `values` only for a backend with a critic). Every rank
receives the same StepBatch; each keeps its shard, runs the model passes the algorithm needs
on it, and the advantages are computed over the *whole* step (a group may straddle ranks):
rank outputs are all-gathered first when an estimator needs per-token model outputs (critic
values for GAE, KL penalties in the reward).

  old logprobs   recomputed when `recompute_old` (several optimizer steps on this data, routing
                 replay, KL in the reward); otherwise train_step uses its own forward's
                 detached logprobs, which are the same numbers (the policy has not moved)
  ref logprobs   when the KL coefficient is > 0
  values         when the estimator needs a critic (gae)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from configs.algorithm import AlgorithmConfig
from trainer.backend import PackedBatch, TrainerBackend
from trainer.batch import StepBatch, from_padded, shard_batches, to_padded
from trainer.losses.advantages import NEEDS_VALUES, AdvantageInputs, AdvantageParams
from trainer.losses.kl import kl_penalty
from trainer.losses.registry import lookup

AllGather = Callable[[Any], list[Any]]
"""all_gather_object(obj) -> every rank's obj in rank order."""


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
            old=ppo_epochs > 1 or algo.moe.routing_replay or kl_in_reward,
            ref=algo.kl.coef > 0,
            values=algo.advantage in NEEDS_VALUES,
        )


def _full_step(
    step: StepBatch, local_idx: list[int], local: list[Tensor], gather: AllGather
) -> list[Tensor]:
    """Per-token tensors for every micro-batch of the step, from every rank's shard."""
    merged: dict[int, Tensor] = {}
    for part in gather(dict(zip(local_idx, local, strict=True))):
        merged.update(part)
    return [merged[i] for i in range(len(step.micro_batches))]


def assign_advantages(
    step: StepBatch,
    algo: AlgorithmConfig,
    *,
    old_logprobs: list[Tensor] | None = None,
    ref_logprobs: list[Tensor] | None = None,
    values: list[Tensor] | None = None,
    eps: float = 1e-6,
) -> None:
    """Fill advantages (and returns, values) of every micro-batch of `step` in place.

    Per-token inputs are lists aligned with step.micro_batches. KL in the reward needs
    old_logprobs and ref_logprobs; gae needs values.
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
    params = AdvantageParams(gamma=algo.gamma, lam=algo.lam, eps=eps)
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
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather | None = None,
    ppo_epochs: int = 1,
) -> list[PackedBatch]:
    """This rank's micro-batches with old/ref logprobs, values and advantages filled."""
    if world_size > 1 and all_gather is None:
        raise ValueError("all_gather: needed when world_size > 1")
    gather: AllGather = all_gather or (lambda obj: [obj])
    plan = PassPlan.for_algorithm(algo, ppo_epochs=ppo_epochs)
    mine = shard_batches(step.micro_batches, rank, world_size)
    index = {id(b): i for i, b in enumerate(step.micro_batches)}
    local_idx = [index[id(b)] for b in mine]
    outputs: dict[str, list[Tensor]] = {}
    if plan.old:
        outputs["old"] = backend.logprobs(mine, model="actor")
    if plan.ref:
        outputs["ref"] = backend.logprobs(mine, model="ref")
    if plan.values:
        outputs["values"] = backend.values(mine)  # type: ignore[attr-defined]
    for key, batch_attr in (("old", "old_logprobs"), ("ref", "ref_logprobs")):
        for batch, t in zip(mine, outputs.get(key, ()), strict=False):
            setattr(batch, batch_attr, t)
    needs_full = plan.values or (algo.kl.coef > 0 and algo.kl.mode == "reward")
    full = {}
    if needs_full:
        full = {k: _full_step(step, local_idx, v, gather) for k, v in outputs.items()}
    assign_advantages(
        step,
        algo,
        old_logprobs=full.get("old"),
        ref_logprobs=full.get("ref"),
        values=full.get("values"),
    )
    return mine
