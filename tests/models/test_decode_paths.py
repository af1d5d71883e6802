"""The decode path's fast variants against the general ones: the [in, out] weight layout, and
the one-token MoE (a GEMV pair per chosen expert) against the sorted grouped-GEMM MoE."""

from __future__ import annotations

import torch

import models.decode as decode
import models.decode_moe as decode_moe
from models import RoutingCapture
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)


def test_decode_weights_are_in_out_and_contiguous_on_the_cpu() -> None:
    model = make_model(seed=20, attention_bias=True)
    w = model.decode_weights()
    attn = model.model.layers[0].self_attn
    layer = w.layers[0]
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(layer.qkv, qkv.t()) and layer.qkv.is_contiguous()
    assert torch.equal(layer.o, attn.o_proj.weight.t()) and layer.o.is_contiguous()
    moe = model.model.layers[-1]
    bank = moe.mlp.experts
    last = w.layers[-1]
    assert torch.equal(last.experts_gate_up, bank.gate_up_proj.transpose(1, 2))
    assert torch.equal(last.experts_down, bank.down_proj.transpose(1, 2))
    assert last.experts_gate_up.is_contiguous() and last.experts_down.is_contiguous()
    shared = moe.mlp.shared_experts
    gate_up = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
    assert torch.equal(last.gate_up, gate_up.t()) and torch.equal(
        last.down, shared.down_proj.weight.t()
    )


def test_cpu_decode_matrices_share_one_arena_and_follow_updates() -> None:
    """Every matrix (and the [H, V] LM head) is a view of one arena; a weight change builds a
    new arena with the new values."""
    model = make_model(seed=24)
    w = model.decode_weights()
    mats = [m for lw in w.layers for m in (lw.qkv, lw.o, lw.gate_up, lw.down) if m is not None]
    mats += [w.lm_head]
    assert len({m.untyped_storage().data_ptr() for m in mats}) == 1
    assert torch.equal(w.lm_head, model.lm_head.weight.t())
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(2.0)
    o = model.decode_weights().layers[0].o
    assert torch.equal(o, model.model.layers[0].self_attn.o_proj.weight.t())


def test_one_token_moe_equals_the_grouped_moe() -> None:
    """Every token of a batch through the one-token path gives the grouped path's row."""
    model = make_model(seed=21)
    w = model.decode_weights()
    layer = next(lw for lw in w.layers if lw.router is not None)
    x = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    experts, weights = decode_moe.route(x, layer, ordered=False)
    assert len({tuple(sorted(e)) for e in experts.tolist()}) > 2  # the routing varies
    grouped = decode_moe.routed_grouped(x, layer, experts, weights)
    for i in range(x.shape[0]):
        row = slice(i, i + 1)
        one = decode_moe.routed_one_token(x[row], layer, experts[row], weights[row])
        torch.testing.assert_close(one, grouped[row], rtol=1e-6, atol=1e-6)


def test_batch_one_decode_equals_uncached_and_routes_like_it() -> None:
    """A batch-1 decode (the one-token MoE) token by token: logits and captured experts."""
    model = make_model(seed=22)
    seq = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(1))
    ref = full_logits(model, seq)
    cache = model.new_kv_cache(1, 16)
    one = torch.ones(1, dtype=torch.long)
    model.forward_cached(
        seq[None, :4],
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        torch.tensor([4]),
        cache,
    )
    for pos in range(4, seq.numel()):
        capture = RoutingCapture()
        logits = model.forward_cached(
            seq[None, pos : pos + 1],
            torch.zeros(1, dtype=torch.long),
            torch.tensor([pos]),
            one,
            cache,
            routing=capture,
        )
        assert (logits[0] - ref[pos]).abs().max().item() < 1e-5, pos
        packed = RoutingCapture()
        model.forward_packed(seq[: pos + 1], torch.tensor([0, pos + 1]), routing=packed)
        assert torch.equal(capture.routed_experts[:, 0, 0], packed.routed_experts[:, -1])


def test_padded_prefill_computes_real_tokens_only() -> None:
    """Rows of 3..9 tokens right-padded to 9 in one forward: each row's logits, experts and
    cached K/V equal the same row prefilled alone (no padding); padding rows are zeros."""
    model = make_model(seed=23)
    g = torch.Generator().manual_seed(2)
    lengths = [3, 9, 5, 7]
    rows = [torch.randint(1, 128, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    slots = torch.tensor([0, 1, 2, 3])
    zeros = torch.zeros(len(rows), dtype=torch.long)
    cache = model.new_kv_cache(4, 12)
    capture = RoutingCapture()
    logits = model.forward_cached(
        ids, slots, zeros, torch.tensor(lengths), cache, all_logits=True, routing=capture
    )
    for i, r in enumerate(rows):
        alone_cache = model.new_kv_cache(1, 12)
        alone = RoutingCapture()
        want = model.forward_cached(
            r[None], slots[:1], zeros[:1], torch.tensor([r.numel()]), alone_cache,
            all_logits=True, routing=alone,
        )  # fmt: skip
        n = r.numel()
        torch.testing.assert_close(logits[i, :n], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(capture.routed_experts[:, i, :n], alone.routed_experts[:, 0])
        assert (capture.routed_experts[:, i, n:] == 0).all()  # padding: not computed
        for layer, alone_layer in zip(cache.layers, alone_cache.layers, strict=True):
            torch.testing.assert_close(layer[i, :, :n], alone_layer[0, :, :n], rtol=1e-5, atol=1e-5)
            assert (layer[i, :, n:] == 0).all()  # nothing written past the row's tokens


def test_shared_expert_in_the_grouped_gemms_is_bit_equal_to_adding_it_after() -> None:
    """The shared expert folded into the bank (expert E, weight 1) gives exactly the sum of
    the routed experts plus the separate shared SwiGLU; RMSNorm in plain ops equals F.rms_norm."""
    model = make_model(seed=23)
    layer = next(lw for lw in model.decode_weights().layers if lw.router is not None)
    assert layer.bank is not None and layer.bank[0].shape[0] == layer.experts_gate_up.shape[0] + 1
    x = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    experts, weights = decode_moe.route(x, layer, ordered=False)
    want = decode_moe.routed_grouped(x, layer, experts, weights)
    want = want + decode_moe.swiglu(x, layer.gate_up, layer.down)
    shared = decode_moe.shared_columns(layer, x.shape[0], x.device)
    got = decode_moe.routed_grouped(x, layer, experts, weights, shared)  # moe()'s torch path
    assert torch.equal(got, want)
    norm = model.decode_weights().norm_const
    w = torch.randn(x.shape[1])
    ref = torch.nn.functional.rms_norm(x, w.shape, w, model.config.rms_norm_eps)
    assert torch.equal(decode._rms(x, w, model.config.rms_norm_eps, norm), ref)
