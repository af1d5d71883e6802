"""Advantage estimators over a step's sequences, as pure torch functions.

Inputs are padded per sequence: N sequences (the step's samples, group after group), L the
longest response. `mask` float [N, L] is 1 on the policy's trainable response tokens (the
Episode's loss_mask) and 0 on tool output and padding: time steps are the policy's actions, so
discounting and bootstrapping skip masked-out tokens. `penalties` float [N, L] are per-token
rewards besides the scalar reward (minus coef x KL when the KL goes into the reward; zeros
otherwise); the scalar reward counts at the last trainable token.

  grpo          A_i = (s_i - mean_g) / (std_g + eps)    s_i = reward_i + sum_t penalties_it
  dr_grpo       A_i =  s_i - mean_g                     (Dr.GRPO: no std division)
  rloo          A_i =  s_i - mean_{j in g, j != i} s_j  (leave-one-out baseline; 0 if n = 1)
  reinforce_pp  G_t = sum_{k>=t} gamma^(k-t) r_k, whitened over every trainable token of the
                batch: (G - mean) / (std + eps)         (REINFORCE++ global normalisation)
  gae           delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1};
                returns = A + V                         (PPO with a critic)
Sequence-level advantages are broadcast to every trainable token. std is the unbiased sample
standard deviation (torch.std), 0 for a group of one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AdvantageInputs:
    """A step's sequences, padded to the longest response L.

    rewards    float32 [N]     scalar reward per sequence
    group_ids  int64   [N]     group (prompt) of each sequence, 0..G-1
    mask       float32 [N, L]  1 on trainable response tokens
    penalties  float32 [N, L] | None  extra per-token rewards (e.g. -coef * KL), 0 on masked
    values     float32 [N, L] | None  critic values V(state before token t) (gae only)
    """

    rewards: Tensor
    group_ids: Tensor
    mask: Tensor
    penalties: Tensor | None = None
    values: Tensor | None = None


@dataclass
class AdvantageResult:
    """advantages float32 [N, L] (0 where mask is 0); returns float32 [N, L] | None (gae)."""

    advantages: Tensor
    returns: Tensor | None = None


@dataclass(frozen=True)
class AdvantageParams:
    """The estimator hyper-parameters (from AlgorithmConfig).

    all_reduce: optional in-place sum over data-parallel ranks (`f(tensor, "sum")`), for the
    batch-wide statistics of REINFORCE++ when every rank holds only its share of the batch.
    """

    gamma: float = 1.0
    lam: float = 1.0
    eps: float = 1e-6
    all_reduce: Callable[[Tensor, str], None] | None = None


AdvantageEstimator = Callable[[AdvantageInputs, AdvantageParams], AdvantageResult]


def sequence_scores(inp: AdvantageInputs) -> Tensor:
    """float [N]: reward plus the sum of the per-token penalties of each sequence."""
    if inp.penalties is None:
        return inp.rewards.float()
    return inp.rewards.float() + (inp.penalties * inp.mask).sum(-1)


def _group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence: (group size, group mean, group unbiased std) of its group, each [N]."""
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    zeros = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, group_ids, torch.ones_like(scores))
    mean = zeros.index_add(0, group_ids, scores) / count.clamp_min(1)
    dev = (scores - mean[group_ids]) ** 2
    var = zeros.index_add(0, group_ids, dev) / (count - 1).clamp_min(1)
    return count[group_ids], mean[group_ids], var.sqrt()[group_ids]


def grpo_advantages(scores: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """float [N]: (s - group mean) / (group std + eps)."""
    _, mean, std = _group_stats(scores, group_ids)
    return (scores - mean) / (std + eps)


def dr_grpo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """float [N]: s - group mean."""
    _, mean, _ = _group_stats(scores, group_ids)
    return scores - mean


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """float [N]: s_i - mean of the other samples of its group = n/(n-1) (s_i - mean); 0 if n=1."""
    count, mean, _ = _group_stats(scores, group_ids)
    scale = count / (count - 1).clamp_min(1)
    return torch.where(count > 1, scale * (scores - mean), torch.zeros_like(scores))


def token_rewards(inp: AdvantageInputs) -> Tensor:
    """float [N, L]: penalties plus the scalar reward at each sequence's last trainable token."""
    mask = inp.mask
    rewards = inp.penalties * mask if inp.penalties is not None else torch.zeros_like(mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values
    has_token = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    rewards = rewards.clone()
    rewards[rows, last[has_token]] += inp.rewards.float()[has_token]
    return rewards


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """float [N, L]: G_t = r_t + gamma G_next over trainable tokens only (0 where mask is 0)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t] > 0
        candidate = rewards[:, t] + gamma * running
        running = torch.where(m, candidate, running)
        out[:, t] = torch.where(m, candidate, torch.zeros_like(candidate))
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> AdvantageResult:
    """Generalised advantage estimation over trainable tokens; V after the last token is 0.

    rewards, values, mask: float [N, L]. Masked-out tokens (tool output, padding) are skipped:
    the next state of a trainable token is the next *trainable* token.
    """
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(last_gae)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * last_gae
        last_gae = torch.where(m, candidate, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, candidate, torch.zeros_like(candidate))
    return AdvantageResult(advantages=adv, returns=(adv + values) * mask)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    eps: float = 1e-6,
    all_reduce: Callable[[Tensor, str], None] | None = None,
) -> Tensor:
    """(x - mean) / (std + eps) over the positions where mask > 0 (unbiased std); 0 elsewhere.

    With all_reduce the mean and std are those of every rank's masked positions together.
    """
    m = mask > 0
    values = x[m].double()
    moments = torch.stack([values.new_tensor(float(values.numel())), values.sum()])
    if all_reduce is not None:
        all_reduce(moments, "sum")
    count, total = float(moments[0]), moments[1]
    if count == 0:
        return torch.zeros_like(x)
    mean = total / count
    sq = ((values - mean) ** 2).sum().reshape(1)
    if all_reduce is not None:
        all_reduce(sq, "sum")
    std = (sq[0] / (count - 1)).sqrt() if count > 1 else sq.new_zeros(())
    return torch.where(m, ((x.double() - mean) / (std + eps)).to(x.dtype), torch.zeros_like(x))


def _broadcast(per_seq: Tensor, mask: Tensor) -> AdvantageResult:
    return AdvantageResult(advantages=per_seq[:, None] * mask)


def _grpo(inp: AdvantageInputs, p: AdvantageParams) -> AdvantageResult:
    return _broadcast(grpo_advantages(sequence_scores(inp), inp.group_ids, p.eps), inp.mask)


def _dr_grpo(inp: AdvantageInputs, p: AdvantageParams) -> AdvantageResult:
    return _broadcast(dr_grpo_advantages(sequence_scores(inp), inp.group_ids), inp.mask)


def _rloo(inp: AdvantageInputs, p: AdvantageParams) -> AdvantageResult:
    return _broadcast(rloo_advantages(sequence_scores(inp), inp.group_ids), inp.mask)


def _reinforce_pp(inp: AdvantageInputs, p: AdvantageParams) -> AdvantageResult:
    returns = discounted_returns(token_rewards(inp), inp.mask, p.gamma)
    return AdvantageResult(advantages=masked_whiten(returns, inp.mask, p.eps, p.all_reduce))


def _gae(inp: AdvantageInputs, p: AdvantageParams) -> AdvantageResult:
    if inp.values is None:
        raise ValueError("values: advantage 'gae' needs critic values (got None)")
    return gae(token_rewards(inp), inp.values, inp.mask, p.gamma, p.lam)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "gae": _gae,
}
NEEDS_VALUES = frozenset({"gae"})
"""Estimators that need critic values (the backend then runs the critic before them)."""
