"""The fp32 CPU decode step of a single token (batch 1): the same math in fewer tensor ops.

At batch 1 a step streams ~44 MB of weights (bench/decode_bound.py's 36M shape) and every
other op then runs with cold caches: ~5 us each in a profile of the step, against ~1.5 us
warm. So this path spends ops only where the math needs them:
- RMSNorm of one row: the sum of squares read to the host, the scale a Python float, one
  addcmul (3 ops, not 6);
- each SwiGLU (routed experts, shared expert, dense MLP) adds its output into the residual
  stream with one in-place addmm (the routing weight as its alpha): no product, scaling and
  sum ops; likewise o_proj;
- routing: scores, bias, top-k on tensors, the k weights on the host in float32 (numpy
  scalars: the operations of models.moe.TopkRouter, value for value).
Sums are grouped differently from the batched path (x + e1 + e2 + shared instead of
x + (e1 + e2 + shared)): logits agree to ~1e-6 (tests/models/test_decode_one.py).
With one torch thread and a C compiler on the machine the same layers run as ~6 C calls
each instead (models/decode_one_native.py: its GEMV streams the weights ~1.3x faster than
MKL's sgemv here, and the small ops cost no dispatch); these torch ops are the fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import decode_one_native as native
from models.decode_one_native import OneToken

if TYPE_CHECKING:
    from models.decode_weights import DecodeLayer, DecodeWeights

# (normed x [1, H], layer, its cache) -> attention output [1, Hq D] before o_proj
Attend = Callable[[Tensor, "DecodeLayer", Tensor], Tensor]


# A one-row GEMV over a [k, n] matrix out of cache streams ~12 GB/s at n = 512 and ~15 at 768
# (MKL's sgemv on this CPU; ~21 at n = 3072). Reading the matrix first with a sum (~30 GB/s, a
# plain stream the prefetcher follows) and then multiplying it out of L2/L3 takes less time in
# all: 12.5-13.5 -> 15-19 GB/s at n <= 768, 10.7 -> 14.1 on [1536, 512]; wider ones lose
# (22 -> 19 at n = 1024). So the step warms every matrix at most this wide before its GEMV.
WARM_MAX_WIDTH = 768


def warm(w: Tensor) -> Tensor:
    """w itself, read once first when it is at most WARM_MAX_WIDTH wide."""
    if w.shape[-1] <= WARM_MAX_WIDTH:
        w.sum()
    return w


def rms_one(x: Tensor, weight: Tensor, eps: float, zero: Tensor) -> Tensor:
    """RMSNorm of x [1, H] (fp32) with weight [H]; zero: a 0-dim fp32 zero."""
    scale = 1.0 / math.sqrt(torch.inner(x, x).item() / x.shape[-1] + eps)
    return torch.addcmul(zero, x, weight, value=scale)


def add_swiglu(x: Tensor, h: Tensor, gate_up: Tensor, down: Tensor, alpha: float = 1.0) -> None:
    """x [1, H] += alpha * swiglu(h [1, H]) in place; gate_up [H, 2 I], down [I, H]."""
    gate, up = (h @ warm(gate_up)).chunk(2, dim=-1)
    x.addmm_(F.silu(gate).mul_(up), warm(down), alpha=alpha)


def _route(h: Tensor, w: DecodeLayer, ordered: bool) -> tuple[list[int], list[float]]:
    """(experts, their weights as floats) of one row, as route() gives them: the experts by
    descending score, or ascending when `ordered`. Past the scores all on the host: the
    weights' float32 arithmetic in numpy scalars is route()'s, value for value; experts whose
    fp32 choice values tie go by id (topk's order there is unspecified)."""
    r = w.router
    scores = F.linear(h, w.router_w).sigmoid_()
    row = scores.tolist()[0]  # the fp32 values, exactly
    if r.n_group > 1:  # group-limited routing: the router's own tensor ops
        choice = r._mask_groups(scores + r.e_score_correction_bias)
        ids = choice.topk(r.top_k, dim=-1).indices[0].tolist()
    else:  # exact sums rank as their fp32 roundings do (rounding is monotonic) but for ties
        choice = [s + b for s, b in zip(row, w.router_bias, strict=True)]
        ids = sorted(range(len(choice)), key=choice.__getitem__, reverse=True)[: r.top_k]
    if ordered:
        ids.sort()
    picked = [np.float32(row[e]) for e in ids]
    if r.norm_topk_prob:
        total = picked[0]
        for p in picked[1:]:
            total = total + p
        total = total + np.float32(1e-20)
        picked = [p / total for p in picked]
    if r.scaling != 1.0:
        picked = [p * np.float32(r.scaling) for p in picked]
    return ids, [float(p) for p in picked]


def add_moe(x: Tensor, h: Tensor, w: DecodeLayer, capture: bool) -> Tensor | None:
    """x [1, H] += the MoE block of h [1, H] (routed experts in ascending order, then the
    shared expert) in place; with `capture` returns the experts int64 [1, k] ascending."""
    ids, weights = _route(h, w, capture)
    for e, alpha in sorted(zip(ids, weights, strict=True)):
        add_swiglu(x, h, *w.experts[e], alpha)
    if w.gate_up is not None:
        add_swiglu(x, h, w.gate_up, w.down)
    return torch.tensor([ids]) if capture else None


def one_token_layers(
    x: Tensor,
    weights: DecodeWeights,
    caches: list[Tensor],
    eps: float,
    capture: bool,
    attend: Attend,
    at: OneToken | None,
) -> list[Tensor]:
    """Every layer on x fp32 [1, H] in place; the MoE layers' experts (with `capture`).
    `attend` is the attention of one layer (models/decode.py's, over the KV cache); `at`
    the token's slot, position and RoPE row (models.decode_one_native.one_token_at): with
    it, and where the C kernels are built, the layers run as C calls (same math)."""
    if at is not None and native.supported(x, weights, caches, at):
        return native.native_layers(x, weights, caches, eps, capture, at, _route)
    zero = weights.norm_const.zero
    routes = []
    for w, cache in zip(weights.layers, caches, strict=True):
        h = rms_one(x, w.in_norm, eps, zero)
        x.addmm_(attend(h, w, cache), warm(w.o))
        h = rms_one(x, w.post_norm, eps, zero)
        if w.router is None:
            add_swiglu(x, h, w.gate_up, w.down)
            continue
        experts = add_moe(x, h, w, capture)
        if experts is not None:
            routes.append(experts)
    return routes
