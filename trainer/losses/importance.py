"""Off-policy correction between the trainer and the rollout engine, and mismatch metrics.

The engine's logprobs (`rollout_logprobs`) differ from the trainer's recomputed ones
(`old_logprobs`): other kernels, FP8 rollout weights, stale samples. Truncated importance
sampling multiplies each token's policy loss by a detached weight:
  truncate  w = clamp(exp(old - rollout), low, high)
  icepop    w = exp(old - rollout) inside [low, high], 0 outside (the token is dropped)
`clipped` marks the tokens whose weight was truncated or zeroed (the TIS clip fraction).
`version_lag_keep` (algorithm.tis.max_token_lag) drops tokens generated more than k versions
behind the trainer, whatever their weight.

Mismatch metrics (per token, to be averaged over trainable tokens):
  abs_diff  |old - rollout|
  k3        exp(old - rollout) - 1 - (old - rollout): the k3 estimate of KL(rollout || train)
            from samples of the rollout policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_RATIO_CLAMP = 20.0


@dataclass
class ISWeights:
    """weights float [T] (detached); clipped float [T] of 0/1; raw = exp(old - rollout) [T]."""

    weights: Tensor
    clipped: Tensor
    raw: Tensor


ISMode = Callable[[Tensor, Tensor, float, float], ISWeights]


def _raw_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    log_ratio = (old_logprobs - rollout_logprobs).detach()
    return torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def truncated_is(
    old_logprobs: Tensor, rollout_logprobs: Tensor, low: float, high: float
) -> ISWeights:
    """w = clamp(exp(old - rollout), low, high)."""
    raw = _raw_ratio(old_logprobs, rollout_logprobs)
    weights = raw.clamp(low, high)
    return ISWeights(weights=weights, clipped=(weights != raw).float(), raw=raw)


def icepop_is(old_logprobs: Tensor, rollout_logprobs: Tensor, low: float, high: float) -> ISWeights:
    """w = exp(old - rollout) inside [low, high], else 0."""
    raw = _raw_ratio(old_logprobs, rollout_logprobs)
    inside = (raw >= low) & (raw <= high)
    weights = torch.where(inside, raw, torch.zeros_like(raw))
    return ISWeights(weights=weights, clipped=(~inside).float(), raw=raw)


IS_MODES: dict[str, ISMode] = {"truncate": truncated_is, "icepop": icepop_is}


def version_lag_keep(
    versions: Tensor, policy_version: int | None, max_lag: int | None
) -> Tensor | None:
    """float [T] of 0/1: 0 on generated tokens (versions >= 0) whose lag policy_version -
    versions exceeds max_lag, 1 elsewhere; None when off (max_lag or policy_version None).
    versions int64 [T] as PackedBatch.versions (-1 on prompt tokens)."""
    if max_lag is None or policy_version is None:
        return None
    too_old = (versions >= 0) & (policy_version - versions > max_lag)
    return (~too_old).float()


def mismatch_abs_diff(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    """float [T]: |old - rollout| (mean it over trainable tokens)."""
    return (old_logprobs - rollout_logprobs).detach().abs()


def mismatch_k3(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    """float [T]: exp(d) - 1 - d with d = old - rollout (k3 of KL(rollout || train))."""
    d = (old_logprobs - rollout_logprobs).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(d) - 1.0 - d
