"""The MoE block of the inference path (models/decode.py): routing, and the routed plus shared
experts as one grouped GEMM pair.

A decode step of a small model on the CPU is bound by its number of tensor ops, not FLOPs.
So when the shared expert has the routed experts' shape (n_shared_experts = 1) it is stored as
expert E of a bank [E + 1, ...] and every token is routed to it with weight 1: the sort, the
grouped GEMMs and the index_add then cover it too, instead of 6 more ops. The sums are those of
the separate path: index_add adds each token's routed experts in ascending order and then the
shared expert (id E, the last group), as `routed + shared` did; y * 1.0 is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from models import decode_batch_native, decode_bf16
from models.moe import grouped_swiglu_in_out

if TYPE_CHECKING:
    from models.decode_weights import DecodeLayer


def swiglu(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x [..., H], gate_up [H, 2 I], down [I, H] -> [..., H]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return F.silu(gate).mul_(up) @ down


def route(x: Tensor, w: DecodeLayer, ordered: bool) -> tuple[Tensor, Tensor]:
    """The router of models.moe.TopkRouter without autograd bookkeeping: (experts int64
    [N, k], weights fp32 [N, k]); experts ascending per token only when `ordered`."""
    r = w.router
    scores = F.linear(x if x.dtype == torch.float32 else x.float(), w.router_w).sigmoid()
    choice = scores + r.e_score_correction_bias
    if r.n_group > 1:
        choice = r._mask_groups(choice)
    experts = choice.topk(r.top_k, dim=-1).indices
    if ordered:
        experts = experts.sort(dim=-1).values
    weights = scores.gather(1, experts)
    if r.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return experts, (weights * r.scaling if r.scaling != 1.0 else weights)


# Folding the shared expert in saves 6 ops but gathers, scales and index_adds N more rows:
# a decode batch (N <= 64) gains, a 2,000-token prefill lost 5 % (bench/decode_before_after.py)
FOLD_MAX_TOKENS = 128


def shared_columns(w: DecodeLayer, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The shared expert's choice column for n tokens: its id E (int64 [n, 1]) in w.bank and
    its weight 1.0 (fp32 [n, 1]). The same for every layer of a forward."""
    ids = torch.full((n, 1), w.bank[0].shape[0] - 1, dtype=torch.int64, device=device)
    return ids, torch.ones(n, 1, device=device)


def routed_grouped(
    x: Tensor,
    w: DecodeLayer,
    experts: Tensor,
    weights: Tensor,
    shared: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Pairs sorted by expert, one grouped GEMM pair, weighted rows added back per token.
    shared: shared_columns(), to run the shared expert too as expert E of w.bank."""
    gate_up, down = w.experts_gate_up, w.experts_down
    if shared is not None:
        gate_up, down = w.bank
        experts = torch.cat([experts, shared[0]], dim=1)
        weights = torch.cat([weights, shared[1]], dim=1)
    k = experts.shape[1]
    flat = experts.view(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    token = torch.div(order, k, rounding_mode="floor") if k > 1 else order
    rows = x.index_select(0, token).to(gate_up.dtype)  # fp32 rows, bf16 experts: as matmuls
    ys = grouped_swiglu_in_out(rows, gate_up, down, counts)
    ys = ys * weights.view(-1, 1).index_select(0, order)
    if ys.dtype != x.dtype:
        ys = ys.to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


def routed_one_token(x: Tensor, w: DecodeLayer, experts: Tensor, weights: Tensor) -> Tensor:
    """x [1, H]: one GEMV pair per chosen expert, summed in ascending expert order (the
    order in which the grouped path's index_add adds them)."""
    ids = experts[0].tolist()
    scale = weights[0].tolist()  # fp32 -> float -> fp32 is exact: the same products
    out = None
    for j in sorted(range(len(ids)), key=ids.__getitem__):
        e = ids[j]
        y = swiglu(x, w.experts_gate_up[e], w.experts_down[e])
        y = y * scale[j] if y.dtype == weights.dtype else (y * weights[:, j : j + 1]).to(x.dtype)
        out = y if out is None else out.add_(y)
    return out


def moe(
    x: Tensor, w: DecodeLayer, ordered: bool, shared: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """x [N, H] -> (routed + shared output [N, H], experts int64 [N, k]). shared: the
    layer's shared_columns() (w.bank set, computed once per forward) to fold the shared
    expert into the grouped GEMMs; worth it for N <= FOLD_MAX_TOKENS. fp32 batches of
    2+ tokens on the CPU run models/decode_batch_native.py's kernel instead (see usable)."""
    half = x.dtype != w.experts_gate_up.dtype  # fp32 rows, bf16 weights: models/decode_bf16.py
    batch = x.shape[0] > 1 and decode_bf16.vector_kernels_usable(x)  # 1 token: routed_one
    routed = decode_bf16.route(x, w) if half or batch else None
    experts, weights = route(x, w, ordered) if routed is None else routed
    if x.shape[0] == 1 and x.device.type == "cpu" and not half:  # a host sync is free here
        out = routed_one_token(x, w, experts, weights)
    elif decode_batch_native.usable(x, w):  # 2-128 fp32 tokens: the experts in one C call
        out = decode_batch_native.moe_rows(x, w, experts, weights)
        if w.bank is not None:  # the shared expert ran as the bank's last
            return out, experts
    elif shared is not None:  # the shared expert rides in the grouped GEMMs
        return routed_grouped(x, w, experts, weights, shared), experts
    else:
        out = routed_grouped(x, w, experts, weights)
    if w.gate_up is not None and half:
        return decode_bf16.mlp_into(out, x, w.gate_up, w.down), experts
    if w.gate_up is not None:
        out = out + swiglu(x, w.gate_up, w.down)
    return out, experts
