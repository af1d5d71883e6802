"""models/decode_bf16.py: a bf16 model on the CPU, bf16 weights in C with fp32 activations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import decode_batch_native as native
from models import decode_bf16, decode_layer_native, decode_moe
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)

needs_kernels = pytest.mark.skipif(native.load() is None, reason="no C compiler here")


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64])
def test_matmul_and_mlp_equal_fp32_math_on_bf16_rounded_inputs(rows: int) -> None:
    """The kernel's products are those of the bf16-rounded rows and weights, summed in fp32."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g)
    w = (torch.randn(64, 96, generator=g) * 0.1).bfloat16()
    want = _rounded(x) @ w.float()
    torch.testing.assert_close(decode_bf16.matmul(x, w), want, rtol=1e-5, atol=1e-5)
    gate_up = (torch.randn(64, 128, generator=g) * 0.1).bfloat16()
    down = (torch.randn(64, 64, generator=g) * 0.1).bfloat16()
    out = torch.randn(rows, 64, generator=g)
    gate, up = (_rounded(x) @ gate_up.float()).chunk(2, dim=-1)
    want = out + _rounded(F.silu(gate) * up) @ down.float()
    torch.testing.assert_close(decode_bf16.mlp_into(out, x, gate_up, down), want)


def _cached_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """All logits [B, L, V] of ids: a prefill of the first half, then one decode step per
    token, on a cache of the model's dtype."""
    b, length = ids.shape
    cache = model.new_kv_cache(b, length)
    slots, pre = torch.arange(b), length // 2
    with torch.inference_mode():
        zeros, full = torch.zeros(b, dtype=torch.int64), torch.full((b,), pre)
        out = [model.forward_cached(ids[:, :pre].contiguous(), slots, zeros, full, cache,
                                    all_logits=True)]  # fmt: skip
        one = torch.ones(b, dtype=torch.int64)
        for t in range(pre, length):
            step = ids[:, t : t + 1].contiguous()
            out.append(model.forward_cached(step, slots, torch.full((b,), t), one, cache))
    return torch.cat([out[0], torch.stack(out[1:], 1)], 1)


@needs_kernels
def test_bf16_path_is_as_close_to_fp32_as_torch_bf16() -> None:
    """320 positions (8 rows, a prefill and 20 decode steps each, every layer kind): the C
    bf16 path's logits against the fp32 model's, no further than torch's own bf16 forward
    (measured: max |diff| 0.014 vs torch's 0.020, logits' std 0.18; argmax all equal)."""
    model = make_model(seed=3)
    ids = torch.randint(1, 128, (8, 40), generator=torch.Generator().manual_seed(0))
    want = _cached_logits(model, ids)
    half = copy.deepcopy(model)
    half.to_dtype(torch.bfloat16)
    assert half.decode_weights().half
    got = _cached_logits(half, ids)
    with torch.inference_mode():
        torch_bf16 = torch.stack([full_logits(half, row) for row in ids]).float()
    ours, theirs = (got - want).abs().max(), (torch_bf16 - want).abs().max()
    assert ours <= 0.05 and ours <= 1.25 * theirs, (ours, theirs)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.98


@needs_kernels
def test_big_bf16_experts_with_many_rows_take_the_grouped_gemms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Experts past L2 (here: any, L2_RESIDENT 0) and over MAX_TOKENS rows: the prefill's
    experts run torch's bf16 grouped GEMMs (moe_rows re-reads each expert per 8 rows), the
    decode steps' still moe_rows; logits as close to the fp32 model's as the C path's."""
    model = make_model(seed=3)
    ids = torch.randint(1, 128, (8, 40), generator=torch.Generator().manual_seed(0))
    want = _cached_logits(model, ids)  # 8 x 20 = 160 prefill rows > MAX_TOKENS
    half = copy.deepcopy(model)
    half.to_dtype(torch.bfloat16)
    got_c = _cached_logits(half, ids)
    calls: list[int] = []
    grouped = decode_moe.routed_grouped
    monkeypatch.setattr(native, "L2_RESIDENT", 0)
    monkeypatch.setattr(
        decode_moe, "routed_grouped", lambda x, *a, **k: calls.append(len(x)) or grouped(x, *a, **k)
    )
    got = _cached_logits(half, ids)
    assert calls and min(calls) > native.MAX_TOKENS
    diff, ours = (got - want).abs().max(), (got_c - want).abs().max()
    assert diff <= 0.05 and diff <= 1.5 * ours, (diff, ours)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.98


def test_without_kernels_bf16_runs_the_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler: the weights are not `half` and the bf16 forward is torch's."""
    monkeypatch.setattr(native, "load", lambda: None)
    model = make_model(seed=4)
    model.to_dtype(torch.bfloat16)
    assert not model.decode_weights().half
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = model.new_kv_cache(2, 8)
    n = torch.full((2,), 6)
    with torch.inference_mode():
        got = model.forward_cached(
            ids, torch.arange(2), torch.zeros(2, dtype=torch.int64), n, cache
        )
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    fp32 = make_model(seed=4)  # and the fp32 model's batches run torch's ops alike
    with torch.inference_mode():
        got = fp32.forward_cached(ids, torch.arange(2), torch.zeros(2, dtype=torch.int64), n,
                                  fp32.new_kv_cache(2, 8))  # fmt: skip
    torch.testing.assert_close(got, torch.stack([full_logits(fp32, r)[-1] for r in ids]))


@needs_kernels
def test_attention_kernels_on_a_bf16_cache_equal_them_on_its_fp32_values() -> None:
    """qkv_rows writes k/v rounded as .to(bfloat16) does; attend_rows reads a bf16 cache
    exactly as the fp32 kernel reads its widened copy (bit for bit)."""
    g = torch.Generator().manual_seed(7)
    hkv, groups, d, max_len = 2, 2, 32, 40
    half = torch.randn(5, 2 * hkv, max_len, d, generator=g).to(torch.bfloat16)
    wide = half.float()
    q = torch.randn(4, hkv * groups, d, generator=g)
    slots, ends = torch.tensor([4, 0, 2, 2]), torch.tensor([40, 1, 17, 18])
    scratch = torch.empty(native.ATTEND_GROUP * 48)
    got = native.attend_rows(q, half, slots, ends, scratch)
    assert torch.equal(got, native.attend_rows(q, wide, slots, ends, scratch))
    qkv = torch.randn(3, hkv * groups + 2 * hkv, d, generator=g)
    rows = torch.randperm(5 * 2 * hkv * max_len, generator=g)[: 3 * 2 * hkv]
    rotation = native.rotation(torch.eye(d))
    cos_sin = (torch.ones(3, d), torch.zeros(3, d), *rotation)
    q_half = native.qkv_rows(qkv, (hkv * groups, hkv), None, 1e-6, cos_sin, half, rows)
    q_wide = native.qkv_rows(qkv, (hkv * groups, hkv), None, 1e-6, cos_sin, wide, rows)
    assert torch.equal(q_half, q_wide)
    assert torch.equal(half.view(-1, d)[rows], wide.view(-1, d)[rows].to(torch.bfloat16))


@needs_kernels
def test_norm_and_router_kernels_equal_the_torch_ops() -> None:
    """rms_rows and route_rows against models/decode.py's _rms and decode_moe.route."""
    from models.decode import _rms
    from models.decode_moe import route

    model = make_model(seed=6)
    model.to_dtype(torch.bfloat16)
    layer = next(w for w in model.decode_weights().layers if w.router is not None)
    x = torch.randn(37, layer.qkv.shape[0], generator=torch.Generator().manual_seed(2))
    want = _rms(x, layer.post_norm, 1e-6)
    torch.testing.assert_close(decode_bf16.rms(x, layer.post_norm, 1e-6), want)
    experts, weights = decode_bf16.route(x, layer)
    want_experts, want_weights = route(x, layer, ordered=True)
    assert torch.equal(experts, want_experts)
    torch.testing.assert_close(weights, want_weights)


@needs_kernels
def test_mlp_kernel_with_fp32_weights_equals_torch() -> None:
    """The fp32 path's dense MLP (2+ tokens, kernels built) runs the same kernel on fp32."""
    from models.decode_moe import swiglu

    g = torch.Generator().manual_seed(8)
    x, out = torch.randn(70, 64, generator=g), torch.randn(70, 64, generator=g)
    gate_up, down = torch.randn(64, 256, generator=g) * 0.1, torch.randn(128, 64, generator=g) * 0.1
    want = out + swiglu(x, gate_up, down)
    torch.testing.assert_close(decode_bf16.mlp_into(out, x, gate_up, down), want)


def test_fp32_matmul_equals_torch_with_or_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(37, 64, generator=g), torch.randn(64, 96, generator=g)
    torch.testing.assert_close(decode_bf16.matmul(x, w), x @ w)
    torch.testing.assert_close(decode_bf16.matmul(x.t().contiguous().t(), w), x @ w)
    monkeypatch.setattr(native, "load", lambda: None)
    torch.testing.assert_close(decode_bf16.matmul(x, w), x @ w)


@needs_kernels
def test_one_bf16_token_takes_the_batch_kernels_and_matches_its_row_in_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decode step of one bf16 row runs the C kernels of a batch (attention from its slot),
    not torch's per-op path, so its logits equal, bit for bit, those of the same row decoded
    beside others; and they stay as close to the fp32 model's as the batch's."""
    model = make_model(seed=5)
    half = copy.deepcopy(model)
    half.to_dtype(torch.bfloat16)
    ids = torch.randint(1, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    fused_rows = []  # rows of each forward the fused C layers ran (None: they did not)
    run = decode_layer_native.run

    def spy(weights, config, x, *args):
        routes = run(weights, config, x, *args)
        fused_rows.append(x.shape[0] if routes is not None else None)
        return routes

    monkeypatch.setattr(decode_layer_native, "run", spy)
    alone = _cached_logits(half, ids[:1])
    assert fused_rows == [12] + [1] * 12  # the prefill, then 12 one-row decode steps
    batched = _cached_logits(half, ids)
    assert torch.equal(alone[0], batched[0])
    want = _cached_logits(model, ids[:1])
    assert (alone - want).abs().max() <= 0.05
