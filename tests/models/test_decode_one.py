"""The one-token fp32 CPU decode path (models/decode_one.py) against the batched path."""

from __future__ import annotations

import pytest
import torch

import models.decode_moe as decode_moe
import models.decode_one as decode_one
import models.decode_one_native as decode_one_native
from models import RoutingCapture
from tests.models.glm_helpers import make_model

torch.set_num_threads(1)


def _moe_layer(seed: int, **overrides):
    model = make_model(seed=seed, **overrides)
    w = model.decode_weights()
    return model, next(lw for lw in w.layers if lw.router is not None)


def test_route_on_the_host_equals_route() -> None:
    """Experts and their weights of a row, bit for bit, ordered or not, with and without
    group-limited routing and a routed scaling factor."""
    for model, layer in (
        _moe_layer(30),
        _moe_layer(33, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    ):
        _check_route(model, layer)


def _check_route(model, layer) -> None:
    x = torch.randn(32, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for ordered in (False, True):
        for i in range(x.shape[0]):
            row = x[i : i + 1]
            experts, weights = decode_moe.route(row, layer, ordered)
            ids, floats = decode_one._route(row, layer, ordered)
            assert ids == experts[0].tolist()
            assert torch.equal(torch.tensor([floats]), weights)


def test_add_moe_and_rms_one_match_the_batched_ops() -> None:
    model, layer = _moe_layer(31)
    x = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    eps = model.config.rms_norm_eps
    zero = torch.tensor(0.0)
    norm = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5
    for i in range(x.shape[0]):
        row = x[i : i + 1]
        want = torch.nn.functional.rms_norm(row, norm.shape, norm, eps)
        torch.testing.assert_close(decode_one.rms_one(row, norm, eps, zero), want)
        out, experts = decode_moe.moe(row, layer, ordered=True)
        got = row.clone()
        chosen = decode_one.add_moe(got, row, layer, capture=True)
        torch.testing.assert_close(got, row + out, rtol=1e-6, atol=1e-6)
        assert torch.equal(chosen, experts)


def test_one_token_decode_equals_a_batch_of_two() -> None:
    """Greedy decode at batch 1 (this path) and the same sequence as row 0 of a batch of two
    (the batched path): the same tokens and experts, logits within 1e-5."""
    model = make_model(seed=32)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    zero, one = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    solo, pair = model.new_kv_cache(1, 16), model.new_kv_cache(2, 16)
    lengths = torch.tensor([6])
    logits = model.forward_cached(prompt, zero, zero, lengths, solo)
    model.forward_cached(
        prompt.repeat(2, 1), torch.arange(2), zero.repeat(2), lengths.repeat(2), pair
    )
    for step in range(8):
        token = logits.argmax(-1).view(1, 1)
        start = torch.tensor([6 + step])
        capture_solo, capture_pair = RoutingCapture(), RoutingCapture()
        logits = model.forward_cached(token, zero, start, one, solo, routing=capture_solo)
        both = model.forward_cached(
            token.repeat(2, 1), torch.arange(2), start.repeat(2), one.repeat(2), pair,
            routing=capture_pair,
        )  # fmt: skip
        torch.testing.assert_close(logits[0], both[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(capture_solo.routed_experts[:, 0], capture_pair.routed_experts[:, 0])


def test_rows_as_host_lists_give_the_same_logits_as_tensors() -> None:
    """forward_cached's rows as host lists (the engine's) or int64 tensors: the same cache
    writes and logits, one token (no mask) and padded multi-token rows alike."""
    model = make_model(seed=41)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    steps = (  # (input_ids, slots, starts, lengths)
        (ids, [0, 1], [0, 0], [5, 3]),
        (ids[:, :1], [0, 1], [5, 3], [1, 1]),
        (ids[:1, 1:2], [0], [6], [1]),
        (ids[1:, 2:3], [1], [4], [1]),
    )
    caches = [model.new_kv_cache(2, 16) for _ in range(2)]
    for input_ids, slots, starts, lengths in steps:
        as_tensors = [torch.tensor(r) for r in (slots, starts, lengths)]
        want = model.forward_cached(input_ids, *as_tensors, caches[0])
        got = model.forward_cached(input_ids, slots, starts, lengths, caches[1])
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(*(c.layers for c in caches), strict=True))


def _greedy_batch_1(model, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits and routed experts of a greedy batch-1 decode (the one-token path)."""
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    cache = model.new_kv_cache(2, 24)
    logits = model.forward_cached(prompt, [1], [0], [6], cache)
    all_logits, experts = [], []
    for step in range(steps):
        token = logits.argmax(-1).view(1, 1)
        capture = RoutingCapture()
        logits = model.forward_cached(token, [1], [6 + step], [1], cache, routing=capture)
        all_logits.append(logits)
        experts.append(capture.routed_experts)
    return all_logits, experts


def test_native_layers_equal_the_torch_ops(monkeypatch) -> None:
    """The C kernels (models/decode_one_native.py) against the torch ops of the same path:
    logits within 1e-5 and the same experts, with q/k/v biases, without qk-norm, with full
    and partial RoPE; slot 1 of two, so the cache write lands in the right slot."""
    if decode_one_native.load() is None:
        pytest.skip("no C compiler here: the torch ops run")
    cases = ({}, {"attention_bias": True}, {"use_qk_norm": False}, {"partial_rotary_factor": 1})
    ran = []
    native_layers = decode_one_native.native_layers
    for overrides in cases:
        model = make_model(seed=34, **overrides)
        monkeypatch.setattr(
            decode_one_native, "native_layers", lambda *a: ran.append(1) or native_layers(*a)
        )
        got, got_experts = _greedy_batch_1(model, 6)
        assert len(ran) == 6
        ran.clear()
        monkeypatch.setattr(decode_one_native, "supported", lambda *a: False)
        want, want_experts = _greedy_batch_1(model, 6)
        monkeypatch.undo()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_experts, want_experts, strict=True):
            assert torch.equal(a, b)


def test_route_one_equals_route() -> None:
    """The C router (one group): route()'s experts, and its weights to fp32 rounding (the
    scores' dot products are summed in another order)."""
    if decode_one_native.load() is None:
        pytest.skip("no C compiler here: the torch ops run")
    model, layer = _moe_layer(35, routed_scaling_factor=2.5)
    lib = decode_one_native.load()
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for ordered in (False, True):
        for i in range(x.shape[0]):
            row = x[i : i + 1]
            experts, weights = decode_moe.route(row, layer, ordered)
            ids, floats = decode_one_native._route(lib, row, layer, ordered, decode_one._route)
            assert ids == experts[0].tolist()
            torch.testing.assert_close(torch.tensor([floats]), weights, rtol=1e-6, atol=0)
