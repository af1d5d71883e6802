"""SwiGLU (silu(gate) * up) in one C call each way (models/swiglu_kernels.c): the fp32 CPU
training forward's dense MLP, shared experts and routed experts.

torch runs chunk, silu and mul forward and silu_backward, two muls and the chunk's gradient
(a zero-filled [M, 2I] plus two copies) backward; on the toy model's small arrays that is
mostly op overhead. Same formula in torch's order (silu = x / (1 + exp(-x)), then * up);
exp is a polynomial (Cephes', ~1 ulp) where torch uses Sleef's, so results differ by float
rounding (~1e-7 relative).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from models import native_build

SOURCE = Path(__file__).with_name("swiglu_kernels.c")
_P, _L = ctypes.c_void_p, ctypes.c_long
_SIGNATURES = {
    "swiglu_forward": [_P, _P, _P, _L, _L, _L],
    "swiglu_backward": [_P, _P, _P, _P, _P, _L, _L, _L],
}


@cache
def load() -> ctypes.CDLL | None:
    """The kernels, or None where they cannot be built here (models/native_build.py)."""
    return native_build.load(SOURCE, _SIGNATURES)


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can take these: plain fp32 contiguous 2-D CPU tensors, outside
    autocast (whose bf16 experts keep torch's ops)."""
    return (
        all(
            type(t) is Tensor
            and t.dtype == torch.float32
            and t.device.type == "cpu"
            and t.dim() == 2
            and t.is_contiguous()
            for t in tensors
        )
        and not torch.is_autocast_enabled("cpu")
        and load() is not None
    )


def _forward(gate: Tensor, up: Tensor, n: int, i: int, ld: int) -> Tensor:
    h = torch.empty(n, i, dtype=torch.float32)
    load().swiglu_forward(gate.data_ptr(), up.data_ptr(), h.data_ptr(), n, i, ld)
    return h


class _Packed(torch.autograd.Function):
    """gu [N, 2I] (gate columns, then up) -> [N, I]."""

    @staticmethod
    def forward(ctx, gu: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gu)
        n, i = gu.shape[0], gu.shape[1] // 2
        return _forward(gu, gu[:, i:], n, i, 2 * i)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (gu,) = ctx.saved_tensors
        grad = grad.contiguous()
        n, i = gu.shape[0], gu.shape[1] // 2
        dgu = torch.empty_like(gu)
        load().swiglu_backward(grad.data_ptr(), gu.data_ptr(), gu[:, i:].data_ptr(),
                               dgu.data_ptr(), dgu[:, i:].data_ptr(), n, i, 2 * i)  # fmt: skip
        return dgu


class _Pair(torch.autograd.Function):
    """gate, up [N, I] -> [N, I]."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return _forward(gate, up, gate.shape[0], gate.shape[1], gate.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n, i = gate.shape
        load().swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(),
                               dgate.data_ptr(), dup.data_ptr(), n, i, i)  # fmt: skip
        return dgate, dup


def _grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def swiglu_packed(gu: Tensor) -> Tensor:
    """silu(gate) * up of gu fp32 [N, 2I] (gate columns first) -> [N, I]; where `usable(gu)`."""
    if _grad(gu):
        return _Packed.apply(gu)
    i = gu.shape[1] // 2
    return _forward(gu, gu[:, i:], gu.shape[0], i, 2 * i)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up of two fp32 [N, I] arrays; where `usable(gate, up)` (same shapes)."""
    if _grad(gate, up):
        return _Pair.apply(gate, up)
    return _forward(gate, up, gate.shape[0], gate.shape[1], gate.shape[1])
