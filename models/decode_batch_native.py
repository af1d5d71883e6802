"""models/decode_batch_kernels.c (experts, matmuls) and decode_attend_kernels.c (qkv_rows,
attend_rows) built and loaded with ctypes: a decode batch's experts and attention in C.

A decode batch of 2-64 tokens gives each of the layer's experts a handful of rows, so the
grouped GEMM pair of models/decode_moe.py is ~20 tiny matmuls plus a sort, gathers and an
index_add, each ~4 us of dispatch on this CPU. `moe_rows` runs the routed experts and the
shared one in one call (routing stays in torch: route()'s exact semantics). `attend_rows`
is a decode step's attention read straight from the cache rows of each row's slot, each to
its own context: no gather of the batch's K/V, no mask, no segments (models/decode_attention.py).
Built once per machine by models/native_build.py (the system C compiler, < 1 s); where it
cannot be built, `load()` / `attend_load()` is None and the torch path runs.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models import native_build

if TYPE_CHECKING:
    from models.decode_weights import DecodeLayer, DecodeWeights


SOURCE = Path(__file__).with_name("decode_batch_kernels.c")
MAX_ROWS = 8  # MAX_ROWS of the C source: rows per block of an expert's matmuls
# The C loops re-read an expert's matrices for every block of MAX_ROWS rows: past this many
# tokens they run only when an expert's two matrices fit in L2 (then they beat MKL's grouped
# GEMMs at any count: 2x at 128-2147 tokens on the toy shapes); bigger experts go to MKL
MAX_TOKENS = 128
L2_RESIDENT = 1 << 20  # bytes of an expert's gate_up + down

ATTEND_GROUP = 8  # attend_rows' scratch: up to this many query heads' scores per KV head
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_F = ctypes.c_float
_SIGNATURES = {
    "moe_rows": [_P, _L, _L, _L, _P, _P, _L, _L, _P, _P, _I, _P, _P, _P, _P, _I],
    "matmul_bf16": [_P, _L, _L, _P, _L, _P, _P],
    "matmul_f32": [_P, _L, _L, _P, _L, _P],
    "mlp_rows": [_P, _L, _L, _L, _P, _P, _P, _P, _P, _P, _I],
}
ATTEND_SOURCE = Path(__file__).with_name("decode_attend_kernels.c")
_ATTEND_SIGNATURES = {
    "attend_rows": [_P, _L, _P, _L, _L, _L, _L, _P, _P, _L, _F, _P, _P, _I],
    "qkv_rows": [_P, _L, _L, _L, _L, _P, _F, _P, _P, _P, _P, _P, _P, _P, _I],
}


@cache
def load() -> ctypes.CDLL | None:
    """The kernels (models/native_build.py); None where they cannot be built here. Kept:
    the kernels check it several times a forward and native_build.load costs ~1.6 us."""
    return native_build.load(SOURCE, _SIGNATURES)


@cache
def attend_load() -> ctypes.CDLL | None:
    """models/decode_attend_kernels.c (attend_rows, qkv_rows); None where not built."""
    return native_build.load(ATTEND_SOURCE, _ATTEND_SIGNATURES)


def _fits(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()


def _fits_weight(t: Tensor) -> bool:
    return t.dtype in (torch.float32, torch.bfloat16) and t.is_cpu and t.is_contiguous()


def usable(x: Tensor, w: DecodeLayer) -> bool:
    """Whether moe_rows can take this layer and these tokens: x fp32 on the CPU, contiguous,
    widths of the kernel's 32-float strips; fp32 experts for 2..MAX_TOKENS rows, or any
    number past 1 when they are L2-resident; bf16 experts (models/decode_bf16.py) alike, and
    for one row (bigger ones with more rows: the grouped GEMMs, in bf16)."""
    gate_up, down = w.bank if w.bank is not None else (w.experts_gate_up, w.experts_down)
    _, h, two_i = gate_up.shape
    half = gate_up.dtype == torch.bfloat16
    expert = h * two_i + down.shape[1] * down.shape[2]  # not gate_up[0].numel(): a view a call
    small = expert * gate_up.element_size() <= L2_RESIDENT
    t = x.shape[0]
    return (
        (1 < t <= MAX_TOKENS or (small and t > 1) or (half and (t <= MAX_TOKENS or small)))
        and h % 32 == 0
        and two_i % 64 == 0
        and _fits(x)
        and _fits_weight(gate_up)
        and down.dtype == gate_up.dtype
        and _fits_weight(down)
        and load() is not None
    )


def _buf(h: int, two_i: int) -> Tensor:
    """expert_rows' scratch: a block's rows, its SwiGLU, its output and its bf16 rows."""
    return torch.empty(MAX_ROWS * (3 * h + 2 * two_i))


def moe_rows(x: Tensor, w: DecodeLayer, experts: Tensor, weights: Tensor) -> Tensor:
    """x fp32 [T, H], experts int64 [T, k], weights fp32 [T, k] -> [T, H]: each token's
    routed experts (ascending ids) weighted, plus the shared expert when it is w.bank's last
    (usable() checked). Other shared experts are the caller's."""
    shared = w.bank is not None
    gate_up, down = w.bank if shared else (w.experts_gate_up, w.experts_down)
    t, h = x.shape
    k, two_i = experts.shape[1], gate_up.shape[2]
    experts = experts.contiguous()
    weights = weights.contiguous()
    out = torch.empty_like(x)
    tok = torch.empty(t * k + t, dtype=torch.int64)  # the kernel's per-expert row lists
    wt = torch.empty(t * k + t)
    buf = _buf(h, two_i)
    load().moe_rows(
        x.data_ptr(),
        t,
        h,
        two_i // 2,
        experts.data_ptr(),
        weights.data_ptr(),
        k,
        w.experts_gate_up.shape[0],
        gate_up.data_ptr(),
        down.data_ptr(),
        int(shared),
        out.data_ptr(),
        tok.data_ptr(),
        wt.data_ptr(),
        buf.data_ptr(),
        int(gate_up.dtype == torch.bfloat16),
    )
    return out


def attention_usable(x: Tensor, caches: list[Tensor], head_dim: int) -> bool:
    """Whether attend_rows (and qkv_rows) can run a forward's layers: fp32 rows on the CPU,
    contiguous fp32 or bf16 caches, a head_dim of 16-float vectors (at most 256)."""
    return (
        head_dim % 16 == 0
        and head_dim <= 256
        and x.dtype == torch.float32
        and all(_fits_weight(c) for c in caches)
        and load() is not None  # the forward's other kernels (decode.py) go with these
        and attend_load() is not None
    )


def attend_rows(q: Tensor, cache: Tensor, slots: Tensor, ends: Tensor, scratch: Tensor) -> Tensor:
    """Decode attention: q fp32 [B, Hq, D] (heads contiguous, rows may be strided), cache
    [slots, 2 Hkv, max_len, D] fp32 or bf16, slots / ends int64 [B] contiguous (row b attends to
    positions [0, ends[b]) of slot slots[b]), scratch fp32 of >= ATTEND_GROUP x max(ends)
    rounded up to 16 -> [B, Hq D]; SDPA's default scale 1 / sqrt(D)."""
    b, hq, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d:
        raise ValueError(f"attend_rows: q heads must be contiguous, strides {q.stride()}")
    _, two_hkv, max_len, _ = cache.shape
    out = torch.empty(b, hq * d)
    hkv = two_hkv // 2
    attend_load().attend_rows(
        q.data_ptr(),
        q.stride(0),
        cache.data_ptr(),
        hkv,
        hq // hkv,
        max_len,
        d,
        slots.data_ptr(),
        ends.data_ptr(),
        b,
        d**-0.5,
        out.data_ptr(),
        scratch.data_ptr(),
        int(cache.dtype == torch.bfloat16),
    )
    return out


def rotation(rotate: Tensor) -> tuple[Tensor, Tensor] | None:
    """models.layers.Rope's rotate [D, D] as qkv_rows takes it: (x @ rotate)[i] = sign[i] *
    x[perm[i]], perm int32 [D], sign fp32 [D]; None unless it is a signed permutation."""
    nonzero = rotate != 0
    if bool((nonzero.sum(0) > 1).any()) or not bool((rotate.abs()[nonzero] == 1).all()):
        return None
    perm = rotate.abs().argmax(0)
    sign = rotate.gather(0, perm[None]).view(-1)
    return perm.to(torch.int32), sign.float().contiguous()


def cached_rotation(weights: DecodeWeights, rotate: Tensor) -> tuple[Tensor, Tensor] | None:
    """rotation(rotate), kept on `weights` (a model's rope has one rotate tensor): both C
    paths (this module's qkv_rows, models/decode_one_native.py) read it every forward."""
    if weights.rotation is None or weights.rotation[0] is not rotate:
        weights.rotation = (rotate, rotation(rotate))
    return weights.rotation[1]


def qkv_rows(
    qkv: Tensor,
    heads: tuple[int, int],
    norm: Tensor | None,
    eps: float,
    rope: tuple[Tensor, Tensor, Tensor, Tensor],
    cache: Tensor,
    rows: Tensor,
) -> Tensor:
    """qkv fp32 [T, Hq + 2 Hkv, D] contiguous, heads (Hq, Hkv), norm: the q/k heads' RMSNorm
    weight [Hq + Hkv, D] or None, rope: (cos, sin) fp32 [T, D] and rotation(); the k and v
    heads go to cache rows `rows` int64 [T 2 Hkv] (cache viewed [-1, D]) -> q [T, Hq, D]."""
    t, _, d = qkv.shape
    hq, hkv = heads
    q = torch.empty(t, hq, d)
    attend_load().qkv_rows(
        qkv.data_ptr(),
        t,
        hq,
        hkv,
        d,
        None if norm is None else norm.data_ptr(),
        eps,
        *(r.data_ptr() for r in rope),
        cache.data_ptr(),
        rows.data_ptr(),
        q.data_ptr(),
        int(cache.dtype == torch.bfloat16),
    )
    return q
