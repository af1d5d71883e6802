"""models/decode_one_kernels.c built and loaded with ctypes: the batch-1 fp32 layer in C calls.

Built once per machine by models/native_build.py (the system C compiler, < 1 s); where it
cannot be built, `load()` is None and models/decode_one.py keeps its torch ops.
No torch headers: the calls take raw pointers of contiguous fp32 CPU tensors.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models import decode_batch_native, native_build

if TYPE_CHECKING:
    from models.batching import CacheBatch
    from models.decode_weights import DecodeLayer, DecodeWeights
    from models.layers import Rope


# (normed row [1, H], layer, ascending) -> (experts, their routing weights as floats)
Route = Callable[[Tensor, "DecodeLayer", bool], tuple[list[int], list[float]]]

SOURCE = Path(__file__).with_name("decode_one_kernels.c")
MAX_N = 8192  # the kernels' widest GEMV output (MAX_N in the C source)
MAX_CONTEXT = 8192  # attend_one's score buffer
MAX_HEAD_DIM = 1024

_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "rms_row": [_P, _P, _P, _L, _F],
    "gemv_add": [_P, _P, _P, _L, _L, _F],
    "swiglu_add": [_P, _P, _P, _P, _L, _L, _F],
    "attend_one": [_P, _P, _P, _P, _L, _L, _L, _L, _F, _P, _P, _P, _P, _P, _L, _L, _P],
    "route_one": [_P, _P, _P, _L, _L, _L, _I, _F, _I, _P, _P],
}
MAX_EXPERTS = 1024  # route_one's buffers


@cache
def load() -> ctypes.CDLL | None:
    """The kernels (models/native_build.py); None where they cannot be built here. Kept:
    the kernels check it several times a forward and native_build.load costs ~1.6 us."""
    return native_build.load(SOURCE, _SIGNATURES)


def usable(t: Tensor) -> bool:
    """Whether the kernels can read `t` by pointer: fp32, contiguous, on the CPU."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


@dataclass
class OneToken:
    """Where the step's token goes: its cache slot and position (it attends to positions
    [0, position]), and its RoPE row: cos/sin fp32 [D] each, rotate [D, D] (models.layers.Rope)."""

    slot: int
    position: int
    cos: Tensor
    sin: Tensor
    rotate: Tensor


def one_token_at(rope: Rope, batch: CacheBatch) -> OneToken | None:
    """The OneToken of a forward of one token (B = L = 1), else None."""
    if batch.mask is not None or batch.host_slots is None or len(batch.host_slots) != 1:
        return None
    cos, sin = rope.cos.reshape(-1), rope.sin.reshape(-1)
    return OneToken(batch.host_slots[0], batch.context - 1, cos, sin, rope.rotate)


def supported(x: Tensor, weights: DecodeWeights, caches: list[Tensor], at: OneToken) -> bool:
    """Whether native_layers runs this step (else the torch ops do). The kernels use one
    thread: with more, torch's own (threaded) GEMVs run."""
    if torch.get_num_threads() != 1 or load() is None:
        return False
    if not usable(x) or not all(usable(c) for c in caches):
        return False
    d = caches[0].shape[-1]
    return (
        x.shape[-1] <= MAX_N
        and at.position < MAX_CONTEXT
        and d <= MAX_HEAD_DIM
        and at.cos.numel() == at.sin.numel() == d
        and all(usable(t) for t in (at.cos, at.sin))
        and _layers_usable(weights)
        and decode_batch_native.cached_rotation(weights, at.rotate) is not None
    )


# DecodeWeights whose layers passed _layer_usable, by id (a weak reference tells a reused
# id): a DecodeWeights never changes its tensors' layout (a weight update writes new values
# into the same tensors, DecodeWeights.refresh; another layout builds a new object), and the
# ~100 checks cost ~0.1 ms of a ~3 ms step
_CHECKED: dict[int, weakref.ref] = {}


def _layers_usable(weights: DecodeWeights) -> bool:
    known = _CHECKED.get(id(weights))
    if known is not None and known() is weights:
        return True
    if not all(_layer_usable(w) for w in weights.layers):
        return False
    if len(_CHECKED) > 8:
        _CHECKED.clear()
    _CHECKED[id(weights)] = weakref.ref(weights)
    return True


def _layer_usable(w: DecodeLayer) -> bool:
    mats = [w.in_norm, w.post_norm, w.qkv, w.o, w.qkv_bias, w.qk_norm, w.gate_up, w.down]
    if w.router is not None:  # contiguous banks: each expert's views are contiguous too
        mats += [w.experts_gate_up, w.experts_down]
    return all(m is None or (usable(m) and m.shape[-1] <= MAX_N) for m in mats)


def native_layers(
    x: Tensor,
    weights: DecodeWeights,
    caches: list[Tensor],
    eps: float,
    capture: bool,
    at: OneToken,
    route: Route,
) -> list[Tensor]:
    """models/decode_one.one_token_layers in C calls (see there); route: its routing of one
    normed row (torch ops, bit-equal to models.moe's)."""
    lib = load()
    hidden = x.shape[-1]
    _, heads, max_len, d = caches[0].shape
    hq = weights.layers[0].qkv.shape[1] // d - heads
    perm, sign = decode_batch_native.cached_rotation(weights, at.rotate)
    rope = (at.cos.data_ptr(), at.sin.data_ptr(), perm.data_ptr(), sign.data_ptr())
    h, attn = torch.empty_like(x), x.new_empty(1, hq * d)
    xp, hp, ap = x.data_ptr(), h.data_ptr(), attn.data_ptr()
    routes = []
    for w, kv in zip(weights.layers, caches, strict=True):
        qkv = (w.qkv.data_ptr(), _ptr(w.qkv_bias), _ptr(w.qk_norm))
        slot = kv.data_ptr() + at.slot * kv.stride(0) * 4
        lib.rms_row(xp, w.in_norm.data_ptr(), hp, hidden, eps)
        lib.attend_one(
            hp, *qkv, hidden, hq, heads // 2, d, eps, *rope, slot, max_len, at.position, ap
        )
        lib.gemv_add(ap, w.o.data_ptr(), xp, hq * d, hidden, 1.0)
        lib.rms_row(xp, w.post_norm.data_ptr(), hp, hidden, eps)
        pairs = [] if w.router is None else sorted(zip(*_route(lib, h, w, capture, route)))
        for e, alpha in pairs:
            gate_up, down = w.experts[e]
            lib.swiglu_add(
                xp, hp, gate_up.data_ptr(), down.data_ptr(), hidden, down.shape[0], alpha
            )
        if w.gate_up is not None:
            lib.swiglu_add(
                xp, hp, w.gate_up.data_ptr(), w.down.data_ptr(), hidden, w.down.shape[0], 1.0
            )
        if capture and w.router is not None:
            routes.append(torch.tensor([[e for e, _ in pairs]]))
    return routes


def _route(lib: ctypes.CDLL, h: Tensor, w: DecodeLayer, ordered: bool, route: Route):
    """route(h, w, ordered), by route_one where the router has one group of experts: the
    same experts and weights but where the scores' fp32 dot products round differently
    (near-ties only)."""
    r = w.router
    bias = r.e_score_correction_bias
    e, hidden = w.router_w.shape
    if r.n_group > 1 or e > MAX_EXPERTS or not (usable(bias) and usable(w.router_w)):
        return route(h, w, ordered)
    ids, weights = (ctypes.c_long * r.top_k)(), (ctypes.c_float * r.top_k)()
    args = (e, hidden, r.top_k, r.norm_topk_prob, r.scaling, ordered, ids, weights)
    lib.route_one(h.data_ptr(), w.router_w.data_ptr(), bias.data_ptr(), *args)
    return list(ids), list(weights)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
