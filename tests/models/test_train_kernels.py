"""The training forward's C kernels against torch's ops: RMSNorm and fused QK-norm + RoPE
(models/rms_norm_native.py), SwiGLU (models/swiglu_native.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import rms_norm_native as native
from models import swiglu_native
from models.layers import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler here")


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], g: torch.Tensor) -> list:
    return list(torch.autograd.grad(out, inputs, g))


@pytest.mark.parametrize("shape", [(37, 128), (5, 7, 32), (3, 20)])
def test_rms_norm_matches_torch(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True)
    g = torch.randn(*shape)
    assert native.usable(x, w)
    want = F.rms_norm(x, w.shape, w, 1e-5)
    got = native.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(got, (x, w), g), _grads(want, (x, w), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no autograd node, same numbers
        torch.testing.assert_close(native.rms_norm(x, w, 1e-5), got, rtol=0, atol=0)


def test_rms_norm_module_falls_back() -> None:
    """bf16, non-contiguous or autocast inputs take F.rms_norm (the module's own paths)."""
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(8, 32)[:, ::2]
    assert not native.usable(x, norm.weight)
    assert not native.usable(x.contiguous().bfloat16(), norm.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.usable(x.contiguous(), norm.weight)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, 1e-5))


def test_signed_perm_of_the_rope_rotation() -> None:
    rope = RotaryEmbedding(32, 16, 10000.0)
    perm = rope.perm
    assert perm is not None
    x = torch.randn(9, 32)
    torch.testing.assert_close(x[:, perm.perm.long()] * perm.sign, x @ rope.rotate)
    back = x[:, perm.inverse_perm.long()] * perm.inverse_sign
    torch.testing.assert_close(back, x @ rope.rotate.T)
    assert native.signed_perm(torch.full((4, 4), 0.5)) is None


@pytest.mark.parametrize("heads", [4, 2])
def test_qk_norm_rope_matches_torch(heads: int) -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(32, 16, 10000.0)(torch.arange(45) % 13, torch.float32)
    x = torch.randn(45, heads, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    g = torch.randn(45, heads, 32)
    assert native.qk_norm_rope_usable(x, w, rope.cos, rope.sin)
    want = rope.apply(F.rms_norm(x, (32,), w, 1e-5))
    got = native.qk_norm_rope(x, w, 1e-5, rope.cos, rope.sin, rope.perm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(got, (x, w), g), _grads(want, (x, w), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_torch() -> None:
    torch.manual_seed(2)
    gu = (torch.randn(33, 40) * 4).requires_grad_()
    g = torch.randn(33, 20)
    gate, up = gu.chunk(2, dim=-1)
    want = F.silu(gate) * up
    (want_grad,) = _grads(want, (gu,), g)
    assert swiglu_native.usable(gu)
    got = swiglu_native.swiglu_packed(gu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(*_grads(got, (gu,), g), want_grad, rtol=1e-5, atol=1e-5)
    a, b = (t.detach().contiguous().requires_grad_() for t in (gate, up))
    pair = swiglu_native.swiglu(a, b)
    torch.testing.assert_close(pair, want, rtol=1e-5, atol=1e-5)
    pair_grad = torch.cat(_grads(pair, (a, b), g), dim=-1)
    torch.testing.assert_close(pair_grad, want_grad, rtol=1e-5, atol=1e-5)
    extreme = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]])
    silu = swiglu_native.swiglu(extreme, torch.ones_like(extreme))
    torch.testing.assert_close(silu, F.silu(extreme))
