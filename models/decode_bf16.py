"""The CPU decode path's C matmul, SwiGLU MLP, RMSNorm and router calls, for two callers
(the name is the first one's): a bf16 model's whole inference path (bf16 weights, fp32
activations), and the fp32 path's batches of 2+ tokens (fp32 weights, same kernels).

torch's bf16 ops are slow on this CPU (a bf16 engine ran 1.4x slower than fp32), while its
vdpbf16ps (AVX512_BF16) multiplies bf16 pairs at twice the fp32 FMA rate. So when the
decode weights are bf16 (models/decode_weights.py) and the C kernels load, every matmul of
models/decode.py runs in models/decode_batch_kernels.c: the activation rows are rounded to
bf16 (nearest even) on their way into a matmul, as a bf16 matmul's input is, the products
are summed in fp32, and everything between the matmuls (residual stream, norms, router,
RoPE, attention) stays fp32, as in the fp32 path and its C kernels; the KV cache keeps the
model's dtype (K/V rounded to bf16 on the way in, widened exactly on the way out). That is
more precise than torch's bf16 forward, which also rounds every op's output.
Where a width does not fit the kernel (K odd, N % 32 != 0) one matmul runs in torch bf16.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from models import decode_batch_native, native_build

if TYPE_CHECKING:
    from models.decode_weights import DecodeLayer, DecodeWeights

SOURCE = Path(__file__).with_name("decode_bf16_kernels.c")
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rms_rows": [_P, _L, _L, _P, _F, _P, _I],
    "route_rows": [_P, _L, _L, _P, _P, _L, _L, _I, _F, _P, _P],
}


@cache
def _vector_kernels() -> ctypes.CDLL | None:
    """models/decode_bf16_kernels.c (norms, router); None where it cannot be built."""
    return native_build.load(SOURCE, _SIGNATURES)


def _half(t: Tensor | None) -> bool:
    return t is None or (t.dtype == torch.bfloat16 and t.is_contiguous())


def usable(weights: DecodeWeights) -> bool:
    """Whether `weights` run this path: bf16 on the CPU, contiguous, the kernels built."""
    if weights.embed.dtype != torch.bfloat16 or weights.embed.device.type != "cpu":
        return False
    mats = [weights.lm_head]
    for w in weights.layers:
        mats += [w.qkv, w.o, w.gate_up, w.down, w.experts_gate_up, w.experts_down]
        if w.qkv_bias is not None:
            return False  # not needed by the models here; the torch bf16 path takes them
        experts = w.bank[0] if w.bank is not None else w.experts_gate_up
        if experts is not None and not (experts.shape[1] % 32 == 0 and experts.shape[2] % 64 == 0):
            return False  # moe_rows' strips (decode_batch_native.usable)
    kernels = decode_batch_native.load() is not None and _vector_kernels() is not None
    return all(_half(m) for m in mats) and kernels


def _fits(k: int, n: int) -> bool:
    return k % 2 == 0 and n % 32 == 0


# fp32 weights: the C loops for up to this many rows (MKL's small GEMMs ran 65-75 GFLOP/s
# at 64 rows on the toy shapes, these ~90), MKL past it
F32_MAX_ROWS = 128


def matmul(x: Tensor, w: Tensor) -> Tensor:
    """x fp32 [T, K] contiguous @ w [K, N] -> fp32 [T, N]: w bf16 (x rounded to bf16), or
    w fp32 (the fp32 path's batches)."""
    t, k = x.shape
    n = w.shape[1]
    if w.dtype == torch.float32:
        fits = t <= F32_MAX_ROWS and n % 32 == 0 and w.is_contiguous() and x.is_contiguous()
        if not fits or decode_batch_native.load() is None:
            return x @ w
        y = torch.empty(t, n)
        decode_batch_native.load().matmul_f32(x.data_ptr(), t, k, w.data_ptr(), n, y.data_ptr())
        return y
    if not _fits(k, n):
        return (x.to(torch.bfloat16) @ w).float()
    y = torch.empty(t, n)
    xh = torch.empty(decode_batch_native.MAX_ROWS * k, dtype=torch.bfloat16)
    load = decode_batch_native.load()
    load.matmul_bf16(x.data_ptr(), t, k, w.data_ptr(), n, y.data_ptr(), xh.data_ptr())
    return y


def mlp_usable(x: Tensor, gate_up: Tensor) -> bool:
    """Whether mlp_into's kernel takes these widths (else it runs matmul and torch ops)."""
    return x.shape[1] % 32 == 0 and gate_up.shape[1] % 64 == 0 and x.is_contiguous()


def mlp_into(out: Tensor, x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """out fp32 [T, H] += SwiGLU MLP of x fp32 [T, H] (gate_up [H, 2 I], down [I, H], both
    bf16, or both fp32 when mlp_usable), in place; returns out."""
    t, h = x.shape
    two_i = gate_up.shape[1]
    if not (mlp_usable(x, gate_up) and out.is_contiguous()):
        gate, up = matmul(x, gate_up).chunk(2, dim=-1)
        return out.add_(matmul((F.silu(gate) * up).contiguous(), down))
    tok = torch.empty(t, dtype=torch.int64)
    wt = torch.empty(t)
    buf = torch.empty(decode_batch_native.MAX_ROWS * (3 * h + 2 * two_i))
    decode_batch_native.load().mlp_rows(
        x.data_ptr(), t, h, two_i // 2, gate_up.data_ptr(), down.data_ptr(), out.data_ptr(),
        tok.data_ptr(), wt.data_ptr(), buf.data_ptr(), int(gate_up.dtype == torch.bfloat16),
    )  # fmt: skip
    return out


def vector_kernels_usable(x: Tensor) -> bool:
    """Whether rms() and route() run in C for these fp32 rows (batches of 2+ on the CPU)."""
    return x.dtype == torch.float32 and x.is_cpu and _vector_kernels() is not None


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x fp32 [T, H] contiguous with weight fp32 or bf16 [H] -> fp32 [T, H]."""
    t, h = x.shape
    if h % 16:
        return F.rms_norm(x, (h,), None, eps) * weight
    out = torch.empty_like(x)
    half = int(weight.dtype == torch.bfloat16)
    _vector_kernels().rms_rows(x.data_ptr(), t, h, weight.data_ptr(), eps, out.data_ptr(), half)
    return out


def route_usable(w: DecodeLayer) -> bool:
    """Whether route_rows takes this layer's router: no expert groups, at most 256 experts,
    a weight the kernel fits (also decode_layer_native's test for its fused layers)."""
    r = w.router
    return r.n_group <= 1 and w.router_w.shape[0] <= 256 and decode_batch_native._fits(w.router_w)


def route(x: Tensor, w: DecodeLayer) -> tuple[Tensor, Tensor] | None:
    """models/decode_moe.route of x fp32 [T, H] in C (experts ascending per token); None
    where route_usable does not hold or H % 16 (then route() runs)."""
    if x.shape[1] % 16 or not route_usable(w):
        return None
    r = w.router
    experts = w.router_w.shape[0]
    t, h = x.shape
    bias = r.e_score_correction_bias.float().contiguous()
    ids = torch.empty(t, r.top_k, dtype=torch.int64)
    weights = torch.empty(t, r.top_k)
    _vector_kernels().route_rows(
        x.data_ptr(), t, h, w.router_w.data_ptr(), bias.data_ptr(), experts, r.top_k,
        int(r.norm_topk_prob), r.scaling, ids.data_ptr(), weights.data_ptr(),
    )  # fmt: skip
    return ids, weights
