"""models/decode_layer_kernels.c: a decode batch's whole layer in one C call.

For batches of 2+ tokens on the CPU (and one bf16 token), models/decode.py runs every piece
of a layer in C already (norms, matmuls, qk-norm/RoPE/cache write, attention, router,
experts), but calls them one by one: ~40 torch and ctypes dispatches a layer, ~30 % of a
batch-64 bf16 decode step. `run_layers` makes one call a layer instead, with the same
kernels in the same order on the same inputs, so its outputs are bit-equal to the per-op
path (tests/models/test_decode_layer_native.py). It applies where each of those calls
would have run its kernel (`plan`); anywhere else decode.py runs the per-op path.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models import decode_batch_native, decode_bf16, native_build

if TYPE_CHECKING:
    from models.decode import _Step as _StepOfDecode
    from models.decode_weights import DecodeLayer, DecodeWeights

SOURCE = Path(__file__).with_name("decode_layer_kernels.c")
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


class _Step(ctypes.Structure):  # Step of the C source, field for field
    _fields_ = [
        *((n, _L) for n in ("T", "H", "Hq", "Hkv", "D", "max_len")),
        ("eps", _F), ("scale", _F), ("half", _I), ("cache_half", _I),
        *((n, _P) for n in ("cos", "sin", "perm", "sign", "write_rows", "slots", "ends")),
        *((n, _P) for n in ("h", "qkv", "q", "attn", "y", "p", "qkn", "xh", "tok", "wt", "buf")),
    ]  # fmt: skip


class _Layer(ctypes.Structure):  # Layer of the C source
    _fields_ = [
        *((n, _P) for n in ("in_norm", "post_norm", "qkv", "o", "qk_norm")),
        ("gate_up", _P), ("down", _P), ("I", _L), ("router_w", _P),
        ("E", _L), ("k", _L), ("I_moe", _L), ("norm_topk", _I), ("scaling", _F),
        ("experts_gate_up", _P), ("experts_down", _P), ("shared_in_bank", _I),
        ("norm_half", _I), ("qk_norm_half", _I),
    ]  # fmt: skip


@cache
def load() -> ctypes.CDLL | None:
    """The library (models/native_build.py); None where it cannot be built here."""
    return native_build.load(SOURCE, {"layer_rows": [_P, _P, _P, _P, _P, _P, _P]})


@dataclass
class Plan:
    """What `run_layers` needs of one DecodeWeights: each layer's struct (its weights'
    pointers: a refresh writes in place, so they stay valid) and the tensors they point
    into, kept alive."""

    layers: list[_Layer]
    keep: list[Tensor]
    widest_k: int  # of the matmuls (matmul_bf16's scratch)
    widest_2i: int  # of the MLPs and experts (expert_rows' scratch)
    k: int  # experts per token (0: no MoE layer)
    expert_bytes: int  # the biggest expert's (L2-resident: decode_batch_native.usable)
    scratch: dict[int, tuple] = field(default_factory=dict)  # per thread: (T, the Step
    # struct, its tensors) of its last forward (the layer structs are only read)


class PlanSlot:
    """DecodeWeights.layer_plan: plan()'s result once computed. Not copied: a deep copy or
    a pickle of the weights has other tensors, so it plans afresh."""

    def __init__(self, plan: Plan | None = None, done: bool = False) -> None:
        self.plan, self.done = plan, done

    def __deepcopy__(self, memo: dict) -> PlanSlot:
        return PlanSlot()

    def __getstate__(self) -> dict:
        return {"plan": None, "done": False}


def _contiguous(*ts: Tensor | None) -> bool:
    return all(t is None or (t.is_contiguous() and t.device.type == "cpu") for t in ts)


def _layer_ok(w: DecodeLayer, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> bool:
    """Whether each of this layer's per-op calls in decode.py runs its kernel (for the
    fused call to do what they do), apart from the batch size (see plan)."""
    h, hq, hkv, d = shape
    mats = [w.qkv, w.o, w.gate_up, w.down]
    if w.qkv_bias is not None or not _contiguous(w.in_norm, w.post_norm, *mats, w.qk_norm):
        return False
    if any(m is not None and m.dtype != dtype for m in mats):
        return False
    if w.gate_up is not None and w.gate_up.shape[1] % 64:  # decode_bf16.mlp_usable
        return False
    widths = [w.qkv.shape[1], w.o.shape[1]]
    if any(n % 32 for n in widths) or (dtype == torch.bfloat16 and (h % 2 or hq * d % 2)):
        return False  # decode_bf16.matmul's kernel
    if w.router is None:
        return w.gate_up is not None
    experts = w.bank[0] if w.bank is not None else w.experts_gate_up
    if not decode_bf16.route_usable(w):
        return False
    if experts.dtype != dtype or experts.shape[2] % 64 or not _contiguous(*(w.bank or ())):
        return False
    # fp32 shared experts outside the bank run torch's swiglu in decode_moe.moe
    return w.bank is not None or w.gate_up is None or dtype == torch.bfloat16


def _layer_struct(w: DecodeLayer) -> tuple[_Layer, list[Tensor]]:
    s = _Layer()
    keep = [w.in_norm, w.post_norm, w.qkv, w.o]
    s.in_norm, s.post_norm, s.qkv, s.o = (t.data_ptr() for t in keep)
    s.norm_half = int(w.in_norm.dtype == torch.bfloat16)
    if w.qk_norm is not None:  # a bf16 one is widened in C (a refresh writes it in place)
        s.qk_norm, s.qk_norm_half = w.qk_norm.data_ptr(), int(w.qk_norm.dtype == torch.bfloat16)
        keep.append(w.qk_norm)
    if w.post_norm.dtype != w.in_norm.dtype:
        raise ValueError("decode_layer_native: in_norm and post_norm of different dtypes")
    if w.gate_up is not None and w.bank is None:  # with a bank, it is the bank's last
        s.gate_up, s.down, s.I = w.gate_up.data_ptr(), w.down.data_ptr(), w.gate_up.shape[1] // 2
        keep += [w.gate_up, w.down]
    if w.router is not None:
        r = w.router
        gate_up, down = w.bank if w.bank is not None else (w.experts_gate_up, w.experts_down)
        s.router_w, s.E, s.k = w.router_w.data_ptr(), w.experts_gate_up.shape[0], r.top_k
        s.I_moe, s.norm_topk, s.scaling = gate_up.shape[2] // 2, int(r.norm_topk_prob), r.scaling
        s.experts_gate_up, s.experts_down = gate_up.data_ptr(), down.data_ptr()
        s.shared_in_bank = int(w.bank is not None)
        keep += [w.router_w, gate_up, down]
    return s, keep


def _expert_bytes(w: DecodeLayer) -> int:
    gate_up, down = w.bank if w.bank is not None else (w.experts_gate_up, w.experts_down)
    return (
        gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2]
    ) * gate_up.element_size()


def plan(weights: DecodeWeights, config) -> Plan | None:
    """The fused layers of these weights (kept on them), None where a layer's per-op path
    would run some piece in torch (then decode.py runs it)."""
    if weights.layer_plan.done:
        return weights.layer_plan.plan
    shape = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
             config.head_dim)  # fmt: skip
    dtype = torch.bfloat16 if weights.half else torch.float32
    ok = (
        load() is not None
        and decode_bf16._vector_kernels() is not None
        and shape[0] % 32 == 0
        and all(_layer_ok(w, dtype, shape) for w in weights.layers)
    )
    result = None
    if ok:
        structs = [_layer_struct(w) for w in weights.layers]
        widths = [m.shape[1] for w in weights.layers for m in (w.gate_up,) if m is not None]
        widths += [w.experts_gate_up.shape[2] for w in weights.layers if w.router is not None]
        tops = [w.router.top_k for w in weights.layers if w.router is not None]
        result = Plan(
            [s for s, _ in structs],
            [t for _, keep in structs for t in keep],
            max(shape[0], shape[1] * shape[3]),
            max(widths),
            max(tops, default=0),
            max((_expert_bytes(w) for w in weights.layers if w.router is not None), default=0),
        )
    weights.layer_plan = PlanSlot(result, True)
    return result


def usable(p: Plan | None, x: Tensor, half: bool, native_mlp: bool) -> bool:
    """Whether this forward's rows x [T, H] run the fused layers: where decode.py's per-op
    path takes every kernel (fp32: its C matmuls stop at decode_bf16.F32_MAX_ROWS rows, its
    experts at decode_batch_native.MAX_TOKENS)."""
    if p is None or not (half or native_mlp) or not x.is_contiguous():
        return False
    t = x.shape[0]
    if half:
        return (
            t <= decode_batch_native.MAX_TOKENS or p.expert_bytes <= decode_batch_native.L2_RESIDENT
        )
    return t <= min(decode_bf16.F32_MAX_ROWS, decode_batch_native.MAX_TOKENS)


def run(weights: DecodeWeights, config, x: Tensor, caches: list[Tensor], step: _StepOfDecode,
        eps: float, shape: tuple[int, int, int], capture: bool) -> list[Tensor] | None:  # fmt: skip
    """decode.py's layers over x [T, H] in place with one C call each, where usable (else
    None: nothing done); each MoE layer's experts int64 [T, k] when `capture`."""
    if step.native is None or step.rope is None:  # not a batch of the C kernels
        return None
    p = plan(weights, config)
    native_mlp = decode_bf16.vector_kernels_usable(x)  # fp32: decode.py's C norms and experts
    if not usable(p, x, step.half, native_mlp):
        return None
    native = step.native
    return run_layers(
        p, x, weights, caches, step.rope, step.write_index, native, eps, shape, capture
    )


def _scratch(p: Plan, t: int, h: int, shape: tuple[int, int, int]) -> tuple:
    """The Step struct with its scratch for t rows: the last forward's when t is the same
    (a decode's steps), else new. (Step struct, experts int64 [t, k], weights fp32 [t, k])."""
    last = p.scratch.get(threading.get_ident())
    if last is not None and last[0] == t:
        return last[1:]
    hq, hkv, d = shape
    s = _Step(t, h, hq, hkv, d)
    width = (hq + 2 * hkv) * d
    rows = decode_batch_native.MAX_ROWS
    floats = torch.empty(t * (2 * h + width + 2 * hq * d) + (hq + hkv) * d)
    offsets = [0, t * h, 2 * t * h, t * (2 * h + width), t * (2 * h + width + hq * d)]
    offsets.append(offsets[-1] + t * hq * d)
    s.h, s.y, s.qkv, s.q, s.attn, s.qkn = (floats[o:].data_ptr() for o in offsets)
    keep = [
        floats,
        torch.empty(rows * p.widest_k, dtype=torch.bfloat16),  # xh
        torch.empty(t * (p.k + 1), dtype=torch.int64),  # tok
        torch.empty(t * (p.k + 1)),  # wt
        torch.empty(rows * (3 * h + 2 * p.widest_2i)),  # buf
    ]
    s.xh, s.tok, s.wt, s.buf = (b.data_ptr() for b in keep[1:])
    k = max(p.k, 1)
    experts, chosen = torch.empty(t, k, dtype=torch.int64), torch.empty(t, k)
    p.scratch[threading.get_ident()] = (t, s, experts, chosen, keep)
    return s, experts, chosen, keep


def run_layers(
    p: Plan,
    x: Tensor,
    weights: DecodeWeights,
    caches: list[Tensor],
    rope: tuple[Tensor, Tensor, Tensor, Tensor],
    write_index: Tensor,
    native: tuple[Tensor, Tensor, Tensor],
    eps: float,
    shape: tuple[int, int, int],
    capture: bool,
) -> list[Tensor]:
    """Every layer over x fp32 [T, H] in place (usable() checked); rope: (cos, sin [T, D],
    perm, sign) and write_index, native (slots, ends, scratch): decode.py's _Step. Returns
    each MoE layer's experts int64 [T, k] when `capture` (else [])."""
    t, h = x.shape
    s, experts, chosen, _ = _scratch(p, t, h, shape)
    s.max_len, s.eps, s.scale, s.half = caches[0].shape[2], eps, shape[2] ** -0.5, weights.half
    s.cache_half = int(caches[0].dtype == torch.bfloat16)
    s.cos, s.sin, s.perm, s.sign = (r.data_ptr() for r in rope)
    s.write_rows, s.slots, s.ends, s.p = (r.data_ptr() for r in (write_index, *native))
    routes = []
    call = load().layer_rows
    step = ctypes.byref(s)
    for w, layer, kv in zip(weights.layers, p.layers, caches, strict=True):
        bias = None
        if w.router is not None:  # read live, as decode_bf16.route does (fp32: no copy)
            bias = w.router.e_score_correction_bias.float().contiguous()
        call(
            x.data_ptr(), ctypes.byref(layer), step, kv.data_ptr(),
            None if bias is None else bias.data_ptr(), experts.data_ptr(), chosen.data_ptr(),
        )  # fmt: skip
        if capture and w.router is not None:
            routes.append(experts.clone())
    return routes
