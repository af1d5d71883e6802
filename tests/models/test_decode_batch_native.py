"""models/decode_batch_native.py's C experts against the torch MoE of models/decode_moe.py."""

from __future__ import annotations

import pytest
import torch

import models.decode_moe as decode_moe
from models import decode_batch_native as native
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)

needs_kernels = pytest.mark.skipif(native.load() is None, reason="no C compiler here")


def _moe_layer(model: torch.nn.Module):
    return next(lw for lw in model.decode_weights().layers if lw.router is not None)


def _torch_moe(x: torch.Tensor, layer) -> torch.Tensor:
    experts, weights = decode_moe.route(x, layer, ordered=False)
    out = decode_moe.routed_grouped(x, layer, experts, weights)
    return out if layer.gate_up is None else out + decode_moe.swiglu(x, layer.gate_up, layer.down)


@needs_kernels
@pytest.mark.parametrize("tokens", [2, 3, 5, 16, 64, 128])
def test_kernel_equals_the_grouped_moe(tokens: int) -> None:
    """Routed experts plus the shared one (the bank's last), within fp32 rounding."""
    layer = _moe_layer(make_model(seed=31))
    x = torch.randn(tokens, layer.qkv.shape[0], generator=torch.Generator().manual_seed(tokens))
    assert native.usable(x, layer) and layer.bank is not None
    got, experts = decode_moe.moe(x, layer, ordered=True)
    torch.testing.assert_close(got, _torch_moe(x, layer), rtol=1e-5, atol=1e-6)
    assert torch.equal(experts, decode_moe.route(x, layer, ordered=True)[0])


@needs_kernels
def test_kernel_without_a_shared_bank_leaves_the_shared_expert_to_torch() -> None:
    """A shared expert wider than the routed ones is not in the bank: still the same sum."""
    layer = _moe_layer(make_model(seed=32, n_shared_experts=2))
    assert layer.bank is None and layer.gate_up is not None
    x = torch.randn(9, layer.qkv.shape[0], generator=torch.Generator().manual_seed(1))
    assert native.usable(x, layer)
    got, _ = decode_moe.moe(x, layer, ordered=False)
    torch.testing.assert_close(got, _torch_moe(x, layer), rtol=1e-5, atol=1e-6)


def test_kernel_is_not_used_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _moe_layer(make_model(seed=33))
    h = layer.qkv.shape[0]
    assert not native.usable(torch.randn(1, h), layer)  # batch 1: models/decode_one.py
    if native.load() is not None:  # L2-resident experts: any batch past one token
        assert native.usable(torch.randn(native.MAX_TOKENS + 1, h), layer)
    monkeypatch.setattr(native, "L2_RESIDENT", 0)  # experts too big for L2: MKL's
    assert not native.usable(torch.randn(native.MAX_TOKENS + 1, h), layer)
    assert not native.usable(torch.randn(h, 4).t(), layer)  # not contiguous
    assert not native.usable(torch.randn(4, h, dtype=torch.bfloat16), layer)


@needs_kernels
def test_cached_decode_batch_matches_the_full_forward() -> None:
    """A batch decoding through the kernel gives the uncached model's logits."""
    model = make_model(seed=34)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.config.vocab_size, (4, 9), generator=g)
    cache = model.new_kv_cache(4, 16)
    with torch.inference_mode():
        n = torch.full((4,), 8, dtype=torch.int64)
        model.forward_cached(
            ids[:, :8].contiguous(), torch.arange(4), torch.zeros(4, dtype=torch.int64), n, cache
        )
        got = model.forward_cached(
            ids[:, 8:].contiguous(), torch.arange(4), n, torch.ones(4, dtype=torch.int64), cache
        )
    want = torch.stack([full_logits(model, row)[-1] for row in ids])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_attention_kernel_equals_sdpa_per_row() -> None:
    """Rows at scattered slots (two on one slot, as a folded prefill has them), each to its own
    context, against SDPA on that row's keys alone; q rows strided as the qkv split leaves them."""
    g = torch.Generator().manual_seed(5)
    hkv, groups, d, max_len = 2, 3, 32, 40
    cache = torch.randn(6, 2 * hkv, max_len, d, generator=g)
    slots = torch.tensor([4, 0, 2, 2])
    ends = torch.tensor([40, 1, 17, 18])
    qkv = torch.randn(4, hkv * groups + 2 * hkv, d, generator=g)
    q = qkv[:, : hkv * groups]
    scratch = torch.empty(native.ATTEND_GROUP * 48)
    got = native.attend_rows(q, cache, slots, ends, scratch).view(4, hkv, groups, d)
    for b in range(4):
        ctx = cache[slots[b], :, : ends[b]]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b].view(hkv, groups, d), ctx[:hkv], ctx[hkv:]
        )
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        native.attend_rows(q.transpose(1, 2), cache, slots, ends, scratch)


@needs_kernels
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qkv_kernel_equals_the_torch_ops(qk_norm: bool) -> None:
    """qk-norm, RoPE (partial rotary) and the K/V cache write in C against decode._qkv_torch."""
    import models.decode as decode

    model = make_model(seed=35, use_qk_norm=qk_norm)
    c = model.config
    w = model.decode_weights()
    layer = w.layers[1]
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(5, hq + 2 * hkv, d, generator=g)
    slots, starts = [3, 0, 1, 3, 2], [4, 0, 7, 5, 1]
    batch = decode.CacheBatch.build(slots, starts, [1] * 5, 1, 16, hq // hkv)
    rope = w.rope(model.model.rotary_emb, batch, 16)
    rope = decode.Rope(rope.cos.reshape(5, 1, d), rope.sin.reshape(5, 1, d), rope.rotate)
    caches = [torch.zeros(4, 2 * hkv, 16, d) for _ in range(2)]
    rows = decode._write_index(batch, caches, 1)
    step = decode._Step(None, rows, None, None, w.norm_const)
    want = decode._qkv_torch(qkv, layer, rope, batch, caches[0], c.rms_norm_eps, step)
    rotation = native.rotation(rope.rotate)
    assert rotation is not None
    cos_sin = (rope.cos.reshape(5, d), rope.sin.reshape(5, d))
    got = native.qkv_rows(
        qkv, (hq, hkv), layer.qk_norm, c.rms_norm_eps, (*cos_sin, *rotation), caches[1], rows
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-5, atol=1e-6)
    assert native.rotation(torch.ones(d, d)) is None  # not a signed permutation


@needs_kernels
def test_prefill_attention_in_the_kernel_equals_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A padded prefill chunk (rows of different lengths, scattered slots, one row after a
    cached prefix) attends in C, causally within each row: the logits of every real token
    are those of the masked-SDPA path."""
    model = make_model(seed=36)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, model.config.vocab_size, (3, 7), generator=g)
    slots, starts = torch.tensor([2, 0, 3]), torch.tensor([0, 0, 4])
    lengths = torch.tensor([7, 3, 5])

    def run() -> torch.Tensor:
        cache = model.new_kv_cache(4, 16)
        with torch.inference_mode():
            prefix = ids[2:, :4].contiguous()  # row 2's first 4 tokens, cached before
            one = torch.ones(1, dtype=torch.int64)
            model.forward_cached(prefix, slots[2:], starts[:1], 4 * one, cache)
            return model.forward_cached(ids, slots, starts, lengths, cache, all_logits=True)

    got = run()
    monkeypatch.setattr(native, "attention_usable", lambda *args: False)
    want = run()
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[row, :n], want[row, :n], rtol=1e-4, atol=1e-5)
