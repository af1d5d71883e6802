"""MoE load balancing without an aux loss (DeepSeek-V3 / GLM-4.5 style) and load metrics.

After each optimizer step every MoE layer's router bias (used for expert *selection* only)
moves against the imbalance observed during the step:
    e_score_correction_bias_i += u * sign(mean_load - load_i)
so overloaded experts become less likely to be chosen and idle ones more likely.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def update_expert_bias(moe_blocks: list[nn.Module], load: Tensor, rate: float) -> Tensor:
    """Nudge each block's `gate.e_score_correction_bias` from load float [n_moe, E].

    Returns the applied update float32 [n_moe, E]. `rate` 0 leaves the biases alone.
    """
    if load.shape[0] != len(moe_blocks):
        raise ValueError(
            f"load: expected {len(moe_blocks)} rows (one per MoE layer), got {tuple(load.shape)}"
        )
    load = load.float()
    delta = rate * torch.sign(load.mean(dim=1, keepdim=True) - load)
    if rate == 0:
        return delta
    for block, row in zip(moe_blocks, delta, strict=True):
        bias = block.gate.e_score_correction_bias
        bias.add_(row.to(bias.dtype))
    return delta


def expert_load_metrics(load: Tensor) -> dict[str, float]:
    """Expert-load metrics from load float [n_moe, E] (routed choices per expert in a step).

    Per MoE layer i: `moe/layer{i}_max_load` and `moe/layer{i}_mean_load` (choices), and the
    step's `moe/imbalance`: max over mean load, averaged over layers (1.0 = balanced).
    """
    if load.numel() == 0:
        return {}
    load = load.float()
    max_load, mean_load = load.max(dim=1).values, load.mean(dim=1)
    out: dict[str, float] = {}
    for i in range(load.shape[0]):
        out[f"moe/layer{i}_max_load"] = float(max_load[i])
        out[f"moe/layer{i}_mean_load"] = float(mean_load[i])
    out["moe/imbalance"] = float((max_load / mean_load.clamp_min(1e-9)).mean())
    return out
