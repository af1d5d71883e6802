"""Critic and regularisation terms per token: clipped value loss and the entropy bonus.

value loss  l_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
            (PPO's clipped value objective; c = AlgorithmConfig.value_clip)
entropy     l_t = -coef * H_t (the bonus lowers the loss where the policy is uncertain)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ValueLossOutput:
    """loss float [T] per token; clipped float [T] of 0/1 (the clipped branch was larger)."""

    loss: Tensor
    clipped: Tensor


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip: float
) -> ValueLossOutput:
    """values (differentiable), old_values, returns: float [T]."""
    unclipped = (values - returns) ** 2
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return ValueLossOutput(
        loss=0.5 * torch.maximum(unclipped, clipped), clipped=(clipped > unclipped).float()
    )


def entropy_bonus(entropy: Tensor, coef: float) -> Tensor:
    """float [T]: -coef * entropy (add to the per-token loss)."""
    return -coef * entropy
