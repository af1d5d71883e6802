"""Expert-load bookkeeping of megatron's MoE routers: what counts, and the step's metrics.

Megatron's TopKRouter counts the tokens routed to each expert in `local_tokens_per_expert`
(when the expert bias is on) and `finalize_model_grads` turns the counts into the loss-free
balancing update of `expert_bias`, then zeroes them. `snapshot_load` must therefore run just
before finalize; `load_metrics` then sums the counts over the TP x DP ranks that routed
different tokens and summarises every MoE layer of the model (all pipeline stages).

`LoadMask` keeps rows that are not real tokens -- the TP padding at the end of a packed row
and whole filler micro-batches (inputs.py) -- out of those counts, so the bias update sees
exactly the tokens the torch backend sees. (megatron 0.16.1's own `padding_mask` argument
cannot do this: its router broadcasts the [N] mask against the [N, E] routing map.)

Metrics: moe_load_max_over_mean (mean over MoE layers of the busiest expert's load / the
mean load; 1.0 is perfect balance), moe_load_min_over_mean, moe_expert_bias_abs_mean.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]


class LoadMask:
    """Forward hooks on every router that un-count routed rows >= `first_excluded` (local
    row index on this rank) from `local_tokens_per_expert`.

    Megatron counts a forward only when grad is enabled. Under full activation recompute the
    original forward runs without grad and the counted forward is the recompute inside the
    backward, possibly after later micro-batches' forwards (1F1B): the row limit then travels
    through a FIFO from the forward to its recompute.
    """

    def __init__(self, model: torch.nn.Module, recompute: bool) -> None:
        self.first_excluded: int | None = None
        self._recompute = recompute
        self._pending: dict[int, deque] = {}
        for router in _routers(model):
            self._pending[id(router)] = deque()
            router.register_forward_hook(self._hook)

    def _hook(self, router: torch.nn.Module, args, output) -> None:
        queue = self._pending[id(router)]
        if not torch.is_grad_enabled():
            if self._recompute and router.training:
                queue.append(self.first_excluded)
            return
        start = queue.popleft() if self._recompute and queue else self.first_excluded
        if start is None:
            return
        routing_map = output[1]
        with torch.no_grad():
            router.local_tokens_per_expert -= routing_map[start:].sum(dim=0).float()


def snapshot_load(model: torch.nn.Module) -> Tensor:
    """float32 [local MoE layers, E]: this rank's routed-token counts (a copy)."""
    routers = _routers(model)
    if not routers:
        return torch.zeros(0, 0)
    return torch.stack([r.local_tokens_per_expert.detach().float().clone() for r in routers])


def load_metrics(model: torch.nn.Module, load: Tensor) -> dict[str, float]:
    """Summarise the step's expert load over every MoE layer; identical on every rank."""
    if load.numel():
        dist.all_reduce(
            load, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        )
        mean = load.mean(dim=1).clamp_min(1e-9)
        bias = torch.stack([r.expert_bias.detach().float() for r in _routers(model)])
        sums = torch.stack(
            [
                (load.max(dim=1).values / mean).sum(),
                (load.min(dim=1).values / mean).sum(),
                bias.abs().mean(dim=1).sum(),
                load.new_tensor(float(load.shape[0])),
            ]
        )
    else:
        sums = torch.zeros(4, device=next(model.parameters()).device)
    sums = sums.to(torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    layers = float(sums[3]) or 1.0
    return {
        "moe_load_max_over_mean": float(sums[0]) / layers,
        "moe_load_min_over_mean": float(sums[1]) / layers,
        "moe_expert_bias_abs_mean": float(sums[2]) / layers,
    }
