"""models/decode_layer_native.py: a layer in one C call equals decode.py's op-by-op layers
bit for bit (logits, KV cache, captured experts), fp32 and bf16, prefill and decode."""

from __future__ import annotations

import threading

import pytest
import torch

from models import decode_layer_native
from models.moe import RoutingCapture
from tests.models.glm_helpers import make_model

torch.set_num_threads(1)

needs_kernels = pytest.mark.skipif(decode_layer_native.load() is None, reason="no C compiler")
USABLE = decode_layer_native.usable


def _run(model, fused: bool, monkeypatch: pytest.MonkeyPatch, lengths: list[int]):
    """A right-padded prefill of rows of `lengths`, then two decode steps: the logits of
    each forward, the cache, and the experts of the last step."""
    calls = []

    def spy(*args) -> bool:
        ok = fused and USABLE(*args)
        calls.append(ok)
        return ok

    monkeypatch.setattr(decode_layer_native, "usable", spy)
    g = torch.Generator().manual_seed(5)
    b, width = len(lengths), max(lengths)
    ids = torch.randint(1, model.config.vocab_size, (b, width + 2), generator=g)
    cache = model.new_kv_cache(b + 1, width + 4)
    slots = torch.arange(1, b + 1)
    n = torch.tensor(lengths)
    out, capture = [], RoutingCapture()
    with torch.inference_mode():
        out.append(model.forward_cached(ids[:, :width].contiguous(), slots, n * 0, n, cache))
        for step in range(2):
            new = ids[:, width + step : width + step + 1].contiguous()
            out.append(
                model.forward_cached(new, slots, n + step, n * 0 + 1, cache, routing=capture)
            )
    return out, [c.clone() for c in cache.layers], capture.routed_experts, calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[5, 3, 7], [4] * 9])
def test_fused_layers_equal_the_op_by_op_layers(
    dtype: torch.dtype, lengths: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(seed=41).to_dtype(dtype)
    if dtype == torch.bfloat16:
        assert model.decode_weights().half  # the C bf16 path, not torch's bf16 ops
    want = _run(model, False, monkeypatch, lengths)
    got = _run(model, True, monkeypatch, lengths)
    assert all(got[3]) and not any(want[3])  # every forward fused / none
    for a, b in zip(got[0], want[0], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got[2], want[2])


@needs_kernels
def test_not_used_past_the_fp32_kernels_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 batches past the C matmuls' rows run the op-by-op path (MKL there)."""
    model = make_model(seed=42)
    weights = model.decode_weights()
    plan = decode_layer_native.plan(weights, model.config)
    assert plan is not None
    x = torch.zeros(200, model.config.hidden_size)
    assert not decode_layer_native.usable(plan, x, False, True)
    assert decode_layer_native.usable(plan, x[:64], False, True)
    assert not decode_layer_native.usable(plan, x[:64], False, False)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_see_weights_changed_in_place(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight update writes the decode weights in place (refresh), the router bias too: the
    fused layers read them through the pointers they kept, as the op-by-op layers read them."""
    model = make_model(seed=43).to_dtype(dtype)
    _run(model, True, monkeypatch, [4, 6])  # plan and scratch made on the old weights
    weights = model.decode_weights()
    assert weights.layer_plan.plan is not None
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(1.05 if "norm" in name else 0.97)
        for block in model.moe_blocks():
            block.gate.e_score_correction_bias.add_(0.3)
    want = _run(model, False, monkeypatch, [4, 6])
    got = _run(model, True, monkeypatch, [4, 6])
    assert model.decode_weights() is weights  # refreshed in place: the same plan
    assert all(got[3])
    for a, b in zip(got[0], want[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got[2], want[2])


@needs_kernels
def test_fused_layers_in_two_threads_at_once() -> None:
    """Each thread has its own scratch and passes its own cache: forwards of one model in
    two threads (the GIL is released in the C calls) give what they give one at a time."""
    model = make_model(seed=44).to_dtype(torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    ids = [torch.randint(1, model.config.vocab_size, (3, 8), generator=g) for _ in range(2)]

    def forward(i: int, out: list) -> None:
        cache = model.new_kv_cache(4, 16)
        n = torch.full((3,), 8)
        with torch.inference_mode():
            for _ in range(20):
                out.append(model.forward_cached(ids[i], torch.arange(1, 4), n * 0, n, cache))

    alone = [[], []]
    for i in range(2):
        forward(i, alone[i])
    together = [[], []]
    threads = [threading.Thread(target=forward, args=(i, together[i])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
