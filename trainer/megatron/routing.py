"""Routing replay for megatron's MoE routers: record the experts of the logprob pass, force
them in training (algorithm.moe.routing_replay; the torch backend's RoutingCapture/Replay).

Megatron's TopKRouter hands its top-k selection to `router.router_replay.get_replay_topk(...)`
when that attribute is set. `RouterReplay` is our per-router object for that hook (megatron's
own class keeps every instance in a class-level list); `Routing` installs one on each router
of this rank and moves indices between them and `PackedBatch.routed_experts`, int64
[n_moe, T, k] over every MoE layer of the model, experts ascending per token.

Where the rows live: a router sees this rank's slice of the padded row (sequence parallelism:
rows [r * T'/n, (r + 1) * T'/n)); its layers are this pipeline stage's MoE layers. Recording
gathers the slices over TP and the stages over PP; replay slices them back. Padding rows
(never real tokens, attending only to themselves) replay experts 0..k-1.

Under full activation recompute the forward that counts runs again inside the backward, after
later micro-batches' forwards (1F1B): the forced experts travel from a forward to its
recompute through a FIFO, as in router_stats.LoadMask.

R3 (routing_replay rollout): the logprob pass runs in mode "replay_record": it forces the
engine's experts, keeps the router's own choice on rows of -1 (the prompt by default) and
records what it used, which training then replays like R2's record.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor

from trainer.megatron.inputs import MegatronInputs


class RouterReplay:
    """One router's record / replay state (duck-types megatron's RouterReplay hook)."""

    def __init__(self, recompute: bool) -> None:
        self.mode: str | None = None  # None | "record" | "replay"
        self.target: Tensor | None = None
        self.recorded: Tensor | None = None
        self._recompute = recompute
        self._backward: deque[Tensor] = deque()

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, compute=None):
        if self.mode == "record":
            probs, indices = compute(scores, topk, num_groups=num_groups, group_topk=group_topk)
            self.recorded = indices.detach()
            return probs, indices
        if self.mode not in ("replay", "replay_record") or self.target is None:
            return compute(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.mode == "replay_record":  # R3's no-grad logprob pass: no recompute FIFO
            indices = self.target.to(scores.device)
            free = (indices < 0).any(dim=-1, keepdim=True)
            if bool(free.any()):
                own = compute(scores, topk, num_groups=num_groups, group_topk=group_topk)[1]
                indices = torch.where(free, own.to(indices.dtype), indices)
            self.recorded = indices.detach()
            return scores.gather(1, indices), indices
        if self._recompute and torch.is_grad_enabled() and self._backward:
            indices = self._backward.popleft()
        else:
            indices = self.target
            if self._recompute and not torch.is_grad_enabled():
                self._backward.append(indices)
        indices = indices.to(scores.device)
        return scores.gather(1, indices), indices


class Routing:
    """Every router of this rank's model stage, with its global MoE-layer index."""

    def __init__(self, model: torch.nn.Module, moe_pattern: list[int], recompute: bool) -> None:
        layers = model.decoder.layers
        offset = layers[0].layer_number - 1 if len(layers) else 0
        self.first_moe = sum(moe_pattern[:offset])
        self.replays: list[RouterReplay] = []
        for module in model.modules():
            if hasattr(module, "router_replay") and hasattr(module, "topk"):
                module.router_replay = RouterReplay(recompute)
                self.replays.append(module.router_replay)

    def set_mode(self, mode: str | None) -> None:
        for replay in self.replays:
            replay.mode = mode

    def recorded(self, item: MegatronInputs) -> Tensor:
        """int64 [local MoE layers, T, k] of the last forward (collective over TP)."""
        if not self.replays:
            return torch.zeros(0, item.batch.num_tokens, 0, dtype=torch.long)
        local = torch.stack([r.recorded for r in self.replays])  # [n, rows, k]
        group = ps.get_tensor_model_parallel_group()
        if (
            ps.get_tensor_model_parallel_world_size() > 1
            and item.input_ids.shape[1] > local.shape[1]
        ):
            pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(pieces, local.contiguous(), group=group)
            local = torch.cat(pieces, dim=1)
        return local[:, : item.batch.num_tokens].sort(dim=-1).values.cpu()

    def replay(
        self, item: MegatronInputs, sp_rank: int, sp_size: int, record: bool = False
    ) -> None:
        """Force the experts of item.batch.routed_experts on this rank's routers; `record`
        (R3's logprob pass): rows of -1 keep the router's choice, and the experts used are
        recorded."""
        routed = item.batch.routed_experts
        if routed is None or not self.replays:
            self.set_mode("record" if record else None)
            return
        padded_rows = item.input_ids.shape[1]
        rows = padded_rows // sp_size
        for i, replay in enumerate(self.replays):
            layer = routed[self.first_moe + i].to(item.input_ids.device)  # [T, k]
            pad = padded_rows - layer.shape[0]
            if pad:
                filler = torch.arange(layer.shape[1], device=layer.device).expand(pad, -1)
                layer = torch.cat([layer, filler])
            replay.target = layer[sp_rank * rows : (sp_rank + 1) * rows]
            replay.mode = "replay_record" if record else "replay"


def gather_stages(per_stage: list[Tensor]) -> list[Tensor]:
    """Concatenate each micro-batch's [local MoE layers, T, k] over the pipeline stages."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return per_stage
    stages: list[list[Tensor] | None] = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, per_stage, group=ps.get_pipeline_model_parallel_group())
    return [torch.cat([s[i] for s in stages if s is not None]) for i in range(len(per_stage))]
