"""Expert-load bookkeeping of megatron's MoE routers: what counts, and the step's metrics.

Megatron's TopKRouter counts the tokens routed to each expert in `local_tokens_per_expert`
(when the expert bias is on) and `finalize_model_grads` turns the counts into the loss-free
balancing update of `expert_bias`, then zeroes them. `snapshot_load` must therefore run just
before finalize; `step_load` then sums the counts over the TP x DP ranks that routed
different tokens.

`LoadMask` keeps rows that are not real tokens -- the TP padding at the end of a packed row
and whole filler micro-batches (inputs.py) -- out of those counts, so the bias update sees
exactly the tokens the torch backend sees. (megatron 0.16.1's own `padding_mask` argument
cannot do this: its router broadcasts the [N] mask against the [N, E] routing map.)

`step_load` assembles the step's [n_moe, E] load of the whole model on every rank; the
metrics are then the torch backend's (trainer.moe_balance.expert_load_metrics).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
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
        for router in routers(model):
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
    found = routers(model)
    if not found:
        return torch.zeros(0, 0)
    return torch.stack([r.local_tokens_per_expert.detach().float().clone() for r in found])


def step_load(load: Tensor) -> Tensor:
    """float32 [n_moe, E] routed choices per expert of every MoE layer of the model (all
    pipeline stages, layer order), from this rank's snapshot; identical on every rank."""
    load = load.clone()
    if load.numel():
        group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(load, group=group)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return load.cpu()
    stages: list[Tensor | None] = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, load.cpu(), group=ps.get_pipeline_model_parallel_group())
    return torch.cat([s for s in stages if s is not None and s.numel()])


def bias_abs_mean(model: torch.nn.Module) -> float:
    """Mean |expert bias| over every MoE layer of the model (all pipeline stages)."""
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for router in routers(model):
        sums[0] += router.expert_bias.detach().abs().mean().double()
        sums[1] += 1
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    return float(sums[0] / sums[1].clamp_min(1))
