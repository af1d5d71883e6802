"""Policy losses per token: PPO clip (DAPO clip-higher, dual clip), GSPO, and SFT.

Each returns the per-token loss [T] *before* aggregation and before the truncated importance
sampling weight (trainer/losses/importance.py) multiplies it, plus the detached ratio and a 0/1
indicator of the tokens where clipping was active (for `clip_frac`).

  ppo_clip  r_t = exp(logp_t - old_t);  l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low,
            1 + eps_high)); with dual clip c (> 1), tokens with A_t < 0 use min(l_t, -c A_t).
  gspo      the sequence ratio s_i = exp(mean_t (logp_t - old_t)) over trainable tokens, used
            per token through the GSPO paper's stop-gradient form
            s_it = sg[s_i] * exp(logp_t - sg[logp_t]) (value s_i, gradient s_i * grad logp_t),
            then clipped as ppo_clip.
  sft       l_t = -logp_t (cross-entropy under the loss mask).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PolicyInputs:
    """Per-token inputs of one micro-batch (T tokens, B sequences).

    logprobs      float32 [T]  current policy logprobs (differentiable)
    old_logprobs  float32 [T]  policy logprobs before the update (detached)
    advantages    float32 [T]
    mask          float32 [T]  1 on trainable tokens
    seq_ids       int64   [T]  sequence of each token, 0..B-1
    num_seqs      int          B
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor
    seq_ids: Tensor
    num_seqs: int


@dataclass(frozen=True)
class ClipParams:
    """Ratio clipping: [1 - eps_low, 1 + eps_high]; dual_clip c > 1 or None."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None


@dataclass
class PolicyLossOutput:
    """loss float [T] per token; ratio float [T] (detached); clipped float [T] of 0/1."""

    loss: Tensor
    ratio: Tensor
    clipped: Tensor


PolicyLoss = Callable[[PolicyInputs, ClipParams], PolicyLossOutput]


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip: ClipParams) -> PolicyLossOutput:
    """Per-token PPO loss from a (differentiable) ratio [T] and advantages [T]."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if clip.dual_clip is not None:
        bound = -advantages * clip.dual_clip
        negative = advantages < 0
        was_clipped = was_clipped | (negative & (bound < loss))
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    return PolicyLossOutput(loss=loss, ratio=ratio.detach(), clipped=was_clipped.float())


def ppo_clip_loss(inp: PolicyInputs, clip: ClipParams) -> PolicyLossOutput:
    """Token-level clipped ratio loss (PPO, DAPO clip-higher, dual clip)."""
    ratio = torch.exp(inp.logprobs - inp.old_logprobs)
    return clipped_surrogate(ratio, inp.advantages, clip)


def sequence_log_ratio(inp: PolicyInputs) -> Tensor:
    """float [B]: mean over each sequence's trainable tokens of (logp - old), detached-free."""
    diff = (inp.logprobs - inp.old_logprobs) * inp.mask
    zeros = torch.zeros(inp.num_seqs, dtype=diff.dtype, device=diff.device)
    sums = zeros.index_add(0, inp.seq_ids, diff)
    counts = zeros.index_add(0, inp.seq_ids, inp.mask.to(diff.dtype))
    return sums / counts.clamp_min(1.0)


def gspo_loss(inp: PolicyInputs, clip: ClipParams) -> PolicyLossOutput:
    """GSPO: the clipped loss on the sequence-level ratio, per token via the stop-gradient form."""
    seq_log_ratio = sequence_log_ratio(inp).detach()[inp.seq_ids]
    log_ratio = seq_log_ratio + inp.logprobs - inp.logprobs.detach()
    return clipped_surrogate(torch.exp(log_ratio), inp.advantages, clip)


def sft_loss(inp: PolicyInputs, clip: ClipParams) -> PolicyLossOutput:
    """Cross-entropy: -logp per token (the mask is applied by the aggregation)."""
    ones = torch.ones_like(inp.logprobs).detach()
    return PolicyLossOutput(loss=-inp.logprobs, ratio=ones, clipped=torch.zeros_like(ones))


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "sft": sft_loss,
}
