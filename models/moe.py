"""The GLM-4.x MoE block: sigmoid top-k router with loss-free balance bias, routed experts
dispatched by sorting tokens per expert, shared experts; routing capture and replay (R3).

Router (same semantics as HF Glm4MoeTopkRouter): scores = sigmoid(x W^T) in fp32;
`e_score_correction_bias` is added to the scores for *selection only*; with n_group > 1 each
group is scored by the sum of its two best biased scores and only the topk_group best groups
stay eligible; the k chosen experts' unbiased scores are optionally normalised to sum 1
(norm_topk_prob) and multiplied by routed_scaling_factor.

Experts are kept fused in memory like transformers 5 (`experts.gate_up_proj` [E, 2I, H] with
gate rows first, `experts.down_proj` [E, H, I]); models.hf_io maps them to the per-expert
on-disk names. Dispatch: one stable argsort of the T*k choices by expert, one gather, one
grouped GEMM pair over the sorted rows (torch._grouped_mm; a per-expert loop where torch lacks
it), one index_add back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import swiglu_native
from models.config import ModelConfig
from models.layers import MLP


@dataclass
class RoutingCapture:
    """Pass to a forward to record the experts chosen per MoE layer and token.

    After the forward, `routed_experts` is int64 [n_moe, T, k] (packed path) or
    [n_moe, B, L, k] (cached path; rows beyond a row's length are zeros: padding is not
    computed, see models/decode.py),
    ordered by expert id within each token.
    """

    routed_experts: Tensor | None = None


@dataclass
class RoutingReplay:
    """Force these experts (routing replay): int64 [n_moe, T, k]; a token whose row holds -1
    keeps the router's own choice (R3 replays the engine's experts of response tokens only).

    Gate weights are recomputed from the current router's scores at the forced experts
    (normalised and scaled as usual), so the router still gets gradients.
    """

    routed_experts: Tensor


@dataclass
class MoEOutput:
    hidden: Tensor  # [N, H]
    experts: Tensor  # int64 [N, k], sorted ascending per token
    load: Tensor  # float32 [E], choices routed to each expert
    aux_loss: Tensor | None  # fp32 scalar, when asked


class TopkRouter(nn.Module):
    """HF name `mlp.gate`: weight [E, H]; buffer e_score_correction_bias fp32 [E]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: Tensor, forced: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, H] -> (experts int64 [N, k] ascending, weights fp32 [N, k], scores fp32 [N, E]).

        forced: int64 [N, k] experts to use instead of the router's choice (replay).
        """
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        if forced is not None and forced.shape != (x.shape[0], self.top_k):
            raise ValueError(
                f"RoutingReplay.routed_experts: expected [*, {x.shape[0]}, {self.top_k}] "
                f"for this layer, got {tuple(forced.shape)}"
            )
        free = None if forced is None else (forced < 0).any(dim=-1, keepdim=True)  # [N, 1]
        if forced is None or bool(free.any()):
            choice = scores.detach() + self.e_score_correction_bias
            if self.n_group > 1:
                choice = self._mask_groups(choice)
            experts = choice.topk(self.top_k, dim=-1, sorted=False).indices
        if forced is not None:  # rows holding -1 keep the router's own choice (R3's prompt)
            forced = forced.to(torch.int64)
            experts = torch.where(free, experts, forced) if bool(free.any()) else forced
        experts = experts.sort(dim=-1).values
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.scaling, scores

    def _mask_groups(self, choice: Tensor) -> Tensor:
        n = choice.shape[0]
        grouped = choice.view(n, self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, -1)


def _grouped_mm_loop(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """Fallback of torch's grouped GEMM: x [M, K] rows grouped by offs, weight [E, K, N]."""
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            outs.append(x[start:end] @ weight[e])
        start = end
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[-1])


# torch >= 2.9 has a grouped GEMM on the CPU (exact: the same per-group matmuls, one call).
_grouped_mm = getattr(torch, "_grouped_mm", None) or _grouped_mm_loop


_CUDA_GROUPED: dict[int, bool] = {}


def _cuda_grouped_mm(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """The grouped GEMM on a GPU. torch's CUDA kernel takes bf16 only (Hopper or newer, rows
    16-byte aligned): under autocast both sides are cast to its dtype first (autocast does not
    cover this op), and anything the kernel cannot take runs the per-expert loop."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_GROUPED:
        _CUDA_GROUPED[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    usable = (
        _grouped_mm is not _grouped_mm_loop
        and _CUDA_GROUPED[index]
        and x.dtype == weight.dtype == torch.bfloat16
        and x.shape[-1] % 8 == 0
        and weight.shape[-1] % 8 == 0
    )
    return (_grouped_mm if usable else _grouped_mm_loop)(x, weight, offs=offs)


def _autocast_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in autocast's compute dtype when autocast is on (the trainer's bf16 mixed
    precision): autocast does not cover torch._grouped_mm, so the experts, most of an MoE
    layer's FLOPs, would otherwise run in fp32. The casts are differentiable: gradients
    reach the fp32 master weights in fp32. Unchanged outside autocast (the engine's path)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def expert_swiglu(
    xs: Tensor, gate_up: Tensor, down: Tensor, counts: Tensor, lora: Any = None
) -> Tensor:
    """Routed experts over rows sorted by expert.

    xs [M, H] (counts[e] consecutive rows for expert e), gate_up [E, 2I, H] (gate rows first),
    down [E, H, I], counts int64 [E] -> [M, H]. Two grouped GEMMs; differentiable.
    lora: a models.lora.ExpertDelta adding each expert's own adapter inside the same grouped
    GEMMs (lora(proj, rows, offs, grouped) -> [M, out] or None when disabled).
    """
    offs = counts.cumsum(0).to(torch.int32)
    xs, gate_up, down = _autocast_operands(xs, gate_up, down)
    grouped = _cuda_grouped_mm if xs.is_cuda else _grouped_mm
    gu = grouped(xs, gate_up.transpose(1, 2), offs=offs)
    if lora is not None and (delta := lora("gate_up_proj", xs, offs, grouped)) is not None:
        gu = gu + delta
    if swiglu_native.usable(gu):  # fp32 CPU: one C call each way, not ~7 ops
        h = swiglu_native.swiglu_packed(gu)
    else:
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate) * up
    out = grouped(h, down.transpose(1, 2), offs=offs)
    if lora is not None and (delta := lora("down_proj", h, offs, grouped)) is not None:
        out = out + delta
    return out


def grouped_swiglu_in_out(xs: Tensor, gate_up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    """The inference path's routed experts (no LoRA, no autocast), weights stored [in, out].

    xs [M, H] (counts[e] consecutive rows for expert e), gate_up [E, H, 2I] (gate columns
    first), down [E, I, H], counts int64 [E] -> [M, H]. Same per-group products as
    `expert_swiglu` on the transposed weights; the CPU kernel reads the [in, out] layout
    faster (models/decode.py stores it contiguous there)."""
    offs = counts.cumsum(0, dtype=torch.int32)
    grouped = _cuda_grouped_mm if xs.is_cuda else _grouped_mm
    gate, up = grouped(xs, gate_up, offs=offs).chunk(2, dim=-1)
    return grouped(F.silu(gate).mul_(up), down, offs=offs)  # no grad here; contiguous


class ExpertBank(nn.Module):
    """HF name `mlp.experts`: all routed experts' SwiGLU weights, fused per layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.intermediate = e, i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.lora: Any = None  # a models.lora.ExpertDelta when LoRA targets the experts

    def forward(self, xs: Tensor, counts: Tensor) -> Tensor:
        """xs [M, H]: rows sorted by expert, counts int64 [E] rows per expert -> [M, H]."""
        return expert_swiglu(xs, self.gate_up_proj, self.down_proj, counts, self.lora)


class MoE(nn.Module):
    """HF `mlp` of an MoE layer: gate (router), experts, shared_experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.gate = TopkRouter(config)
        self.experts = ExpertBank(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared) if shared else None

    def forward(
        self, x: Tensor, forced: Tensor | None = None, aux: bool = False, rows: Tensor | None = None
    ) -> MoEOutput:
        """x [N, H] -> MoEOutput; forced [N, k] replays routing; aux computes the aux loss.

        rows: int64 [M], the only rows whose output the caller reads (the training forward's
        last layer: the positions that predict trainable tokens). The router still runs on
        all N rows (experts, load and aux loss are the full pass's), but the experts and the
        shared experts run on these rows only, and `hidden` is their [M, H] output."""
        experts, weights, scores = self.gate(x, forced)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        load = counts.float()
        aux_loss = _switch_aux_loss(scores, load, self.top_k) if aux else None
        if rows is not None:
            x, chosen, weights = x.index_select(0, rows), experts[rows], weights[rows]
            counts = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        else:
            chosen = experts
        order = chosen.reshape(-1).argsort(stable=True)
        token = order // self.top_k
        ys = self.experts(x.index_select(0, token), counts)
        ys = (ys * weights.reshape(-1)[order].unsqueeze(1)).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, ys)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return MoEOutput(out, experts, load, aux_loss)


def _switch_aux_loss(scores: Tensor, load: Tensor, top_k: int) -> Tensor:
    """E * sum_e f_e * P_e: f = fraction of the N*k choices per expert (no grad), P = mean
    over tokens of the scores normalised per token (grad to the router)."""
    n, num_experts = scores.shape
    fraction = load / max(n * top_k, 1)
    prob = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
    return num_experts * (fraction * prob).sum()


def weighted_expert_load(experts: Tensor, multiplicity: Tensor, load: Tensor) -> Tensor:
    """float32 [E]: choices per expert, token t counted multiplicity[t] times (a shared
    prompt token stands for every sequence that holds it). experts int64 [T, k]."""
    weights = multiplicity.to(load.device, load.dtype)[:, None].expand_as(experts)
    return torch.zeros_like(load).index_add(0, experts.reshape(-1), weights.reshape(-1))
