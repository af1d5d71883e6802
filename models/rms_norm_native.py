"""RMSNorm in two C calls (models/rms_norm_kernels.c): the fp32 CPU training forward's norms.

torch's F.rms_norm runs ~6 ops forward and ~10 backward, each a dispatch over a small
[T, 128] (or [T, heads, 32]) array; the toy model's 17 norms a step were ~4 ms of the
trainer's ~47 ms of CPU, mostly op overhead. Here the forward is one C call that also keeps
each row's 1/rms, and the backward one more. Same formula as F.rms_norm (x * rsqrt(mean(x^2)
+ eps) * w); sums in another order, so results differ by float rounding (~1e-7 relative).
Used by models.layers.RMSNorm where `usable` holds; elsewhere F.rms_norm runs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from models import native_build

SOURCE = Path(__file__).with_name("rms_norm_kernels.c")
_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "rms_forward": [_P, _P, _P, _P, _L, _L, _F],
    "rms_backward": [_P, _P, _P, _P, _P, _P, _L, _L],
    "qk_norm_rope_forward": [_P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _F],
    "qk_norm_rope_backward": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L],
}
MAX_D = 1024  # the fused QK-norm + RoPE kernels' widest head (MAX_D in the C source)


@dataclass(frozen=True)
class SignedPerm:
    """RoPE's rotation R [D, D] as (x R)[i] = sign[i] x[perm[i]] (sign 0 on pass-through
    dims), and its transpose as inverse_perm / inverse_sign: int32 / fp32 [D] each."""

    perm: Tensor
    sign: Tensor
    inverse_perm: Tensor
    inverse_sign: Tensor


def signed_perm(rotate: Tensor) -> SignedPerm | None:
    """rotate [D, D] as a SignedPerm; None unless every column holds at most one +-1."""
    if rotate.device.type == "meta":  # no values to read
        return None
    r = rotate.detach().float().cpu()
    d = r.shape[0]
    perm, sign = list(range(d)), [0.0] * d
    inverse_perm, inverse_sign = list(range(d)), [0.0] * d
    for i in range(d):
        rows = r[:, i].nonzero().flatten().tolist()
        if len(rows) > 1 or (rows and abs(float(r[rows[0], i])) != 1.0):
            return None
        if rows:
            perm[i], sign[i] = rows[0], float(r[rows[0], i])
            inverse_perm[rows[0]], inverse_sign[rows[0]] = i, sign[i]
    if d > MAX_D or len({perm[i] for i in range(d) if sign[i]}) != sum(1 for v in sign if v):
        return None
    cpu = torch.device("cpu")  # the kernels' tables, whatever the default device
    ints = lambda v: torch.tensor(v, dtype=torch.int32, device=cpu)  # noqa: E731
    floats = lambda v: torch.tensor(v, dtype=torch.float32, device=cpu)  # noqa: E731
    return SignedPerm(ints(perm), floats(sign), ints(inverse_perm), floats(inverse_sign))


@cache
def load() -> ctypes.CDLL | None:
    """The kernels, or None where they cannot be built here (models/native_build.py)."""
    return native_build.load(SOURCE, _SIGNATURES)


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether the kernels can take x and weight: plain fp32 CPU tensors, contiguous (not
    DTensors, not under autocast, where F.rms_norm keeps its own dtype rules)."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and type(x) is Tensor
        and type(weight.data) is Tensor
        and weight.dtype == torch.float32
        and x.is_contiguous()
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and load() is not None
    )


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    y = torch.empty_like(x)
    rstd = torch.empty(x.numel() // max(d, 1), dtype=torch.float32)
    load().rms_forward(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                       rstd.numel(), d, eps)  # fmt: skip
    return y, rstd


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        y, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        gx = torch.empty_like(x)
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        load().rms_backward(grad.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                            gx.data_ptr(), 0 if gw is None else gw.data_ptr(),
                            rstd.numel(), x.shape[-1])  # fmt: skip
        return (gx if ctx.needs_input_grad[0] else None), gw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x fp32 [..., D] contiguous, weight fp32 [D] -> x * rsqrt(mean(x^2) + eps) * weight
    (differentiable; call only where `usable(x, weight)`)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RmsNorm.apply(x, weight, eps)
    return _forward(x, weight, eps)[0]


class _QkNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, sin, perm):  # type: ignore[override]
        t, h, d = x.shape
        y = torch.empty_like(x)
        rstd = torch.empty(t * h, dtype=torch.float32)
        load().qk_norm_rope_forward(
            x.data_ptr(), weight.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            perm.perm.data_ptr(), perm.sign.data_ptr(), y.data_ptr(), rstd.data_ptr(),
            t, h, d, eps,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, rstd, cos, sin)
        ctx.perm = perm
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, rstd, cos, sin = ctx.saved_tensors
        grad = grad.contiguous()
        t, h, d = x.shape
        gx = torch.empty_like(x)
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        load().qk_norm_rope_backward(
            grad.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), ctx.perm.inverse_perm.data_ptr(), ctx.perm.inverse_sign.data_ptr(),
            gx.data_ptr(), 0 if gw is None else gw.data_ptr(), t, h, d,
        )  # fmt: skip
        return (gx if ctx.needs_input_grad[0] else None), gw, None, None, None, None


def qk_norm_rope_usable(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `qk_norm_rope` can take these: `usable(x, weight)` with x [T, H, D] and
    cos / sin fp32 [T, 1, D] contiguous (one row per token, shared by its heads)."""
    want = (x.shape[0], 1, x.shape[-1])
    return (
        x.dim() == 3
        and x.shape[-1] <= MAX_D
        and all(
            c.shape == want
            and c.dtype == torch.float32
            and c.is_contiguous()
            and not c.requires_grad
            for c in (cos, sin)
        )
        and usable(x, weight)
    )


def qk_norm_rope(
    x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, perm: SignedPerm
) -> Tensor:
    """RoPE (x * cos + (x R) * sin) of RMSNorm(x) * weight in two C calls, differentiable.
    x fp32 [T, H, D] contiguous, cos / sin [T, 1, D]; call where `qk_norm_rope_usable`."""
    return _QkNormRope.apply(x, weight, eps, cos, sin, perm)
