"""The KV-cache inference path against the uncached training path."""

from __future__ import annotations

import pytest
import torch

import models.moe as moe
from models import RoutingCapture
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)


def _rows(seqs, starts, lengths):
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, a, n) in enumerate(zip(seqs, starts, lengths)):
        ids[i, :n] = s[a : a + n]
    return ids


@pytest.mark.parametrize("grouped_gemm", [True, False])
def test_mixed_prefill_then_batched_decode_equals_uncached(grouped_gemm: bool, monkeypatch) -> None:
    """Rows of different lengths, arbitrary slots, mixed prefill/decode rows in one call;
    with torch's grouped GEMM and with the per-expert loop used where torch lacks it."""
    if not grouped_gemm:
        monkeypatch.setattr(moe, "_grouped_mm", moe._grouped_mm_loop)
    model = make_model(seed=10, attention_bias=True)
    seqs = [torch.randint(0, 128, (n,)) for n in (9, 14, 5, 11)]
    ref = [full_logits(model, s) for s in seqs]
    cache = model.new_kv_cache(num_slots=7, max_len=16)
    slots = torch.tensor([6, 0, 3, 2])
    # call 1: prefill rows of 3, 6, 1 and 4 tokens
    pos = [0, 0, 0, 0]
    todo = [3, 6, 1, 4]
    step = 0
    while any(p < s.numel() for p, s in zip(pos, seqs)):
        live = [i for i in range(4) if pos[i] < seqs[i].numel()]
        n = [min(todo[i], seqs[i].numel() - pos[i]) for i in live]
        ids = _rows([seqs[i] for i in live], [pos[i] for i in live], n)
        logits = model.forward_cached(
            ids,
            slots[live],
            torch.tensor([pos[i] for i in live]),
            torch.tensor(n),
            cache,
            all_logits=True,
        )
        for j, i in enumerate(live):
            want = ref[i][pos[i] : pos[i] + n[j]]
            assert (logits[j, : n[j]] - want).abs().max().item() < 1e-5, (step, i)
            pos[i] += n[j]
        # from now on: one decode token per row, except row 1 which keeps taking 2 (mixed)
        todo = [1, 2, 1, 1]
        step += 1
    assert step > 3


def test_last_token_logits_and_routing_capture() -> None:
    model = make_model(seed=11)
    seqs = [torch.randint(0, 128, (n,)) for n in (4, 7)]
    cache = model.new_kv_cache(2, 8)
    ids = _rows(seqs, [0, 0], [4, 7])
    capture = RoutingCapture()
    last = model.forward_cached(
        ids, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), torch.tensor([4, 7]), cache,
        routing=capture,
    )  # fmt: skip
    assert last.shape == (2, 128) and last.dtype == torch.float32
    for i, s in enumerate(seqs):
        assert (last[i] - full_logits(model, s)[-1]).abs().max().item() < 1e-5
    # the cached path routes exactly like the training path
    packed = RoutingCapture()
    model.forward_packed(seqs[1], torch.tensor([0, 7]), routing=packed)
    assert capture.routed_experts.shape == (2, 2, 7, 2)
    assert torch.equal(capture.routed_experts[:, 1], packed.routed_experts)


def test_decode_weights_follow_weight_changes() -> None:
    model = make_model(seed=12)
    ids = torch.randint(0, 128, (1, 5))
    args = (torch.tensor([0]), torch.tensor([0]), torch.tensor([5]))
    before = model.forward_cached(ids, *args, model.new_kv_cache(1, 8))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(1.5)  # in place, like an optimizer
    after = model.forward_cached(ids, *args, model.new_kv_cache(1, 8))
    assert (after - before).abs().max().item() > 1e-4
    assert (after - full_logits(model, ids[0])[-1]).abs().max().item() < 1e-5


def test_slot_reuse_needs_no_reset_and_bounds_are_checked() -> None:
    model = make_model(seed=13)
    cache = model.new_kv_cache(1, 10)
    zero, one = torch.tensor([0]), torch.tensor([1])
    long_seq = torch.randint(0, 128, (1, 9))
    model.forward_cached(long_seq, zero, zero, torch.tensor([9]), cache)
    short = torch.randint(0, 128, (1, 3))
    got = model.forward_cached(short, zero, zero, torch.tensor([3]), cache)
    assert (got[0] - full_logits(model, short[0])[-1]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="max_len"):
        model.forward_cached(short, zero, torch.tensor([8]), torch.tensor([3]), cache)
    with pytest.raises(ValueError, match="lengths"):
        model.forward_cached(short, zero, zero, torch.tensor([4]), cache)
    with pytest.raises(ValueError, match="slots, start_pos and lengths"):
        model.forward_cached(short, torch.tensor([0, 0]), zero, one, cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_kv_cache(1, model.config.max_position_embeddings + 1)


def test_bf16_model_and_bf16_cache_under_fp32_model() -> None:
    model = make_model(seed=14)
    ids = torch.randint(0, 128, (1, 10))
    ref = full_logits(model, ids[0])
    args = (torch.tensor([0]), torch.tensor([0]), torch.tensor([10]))
    # fp32 model, bf16 cache: keys/values rounded to bf16, the rest in fp32
    got = model.forward_cached(
        ids, *args, model.new_kv_cache(1, 10, torch.bfloat16), all_logits=True
    )
    err = (got[0] - ref).abs().max().item()
    assert 1e-7 < err < 2e-2
    # bf16 model: the cached path equals its own packed path up to bf16 round-off
    bf16 = make_model(seed=14).to_dtype(torch.bfloat16)
    got = bf16.forward_cached(ids, *args, bf16.new_kv_cache(1, 10), all_logits=True)
    assert bf16.new_kv_cache(1, 2).dtype == torch.bfloat16
    assert (got[0] - full_logits(bf16, ids[0])).abs().max().item() < 3e-2
    assert (got[0] - ref).abs().max().item() < 6e-2


def test_weight_loads_refresh_the_decode_weights() -> None:
    """load_hf_state_dict (the weight-update path) must invalidate the fused decode views,
    for every kind of tensor: attention, norms, router, experts, embeddings."""
    model = make_model(seed=15, tie_word_embeddings=False)
    ids = torch.randint(0, 128, (1, 6))
    args = (torch.tensor([0]), torch.tensor([0]), torch.tensor([6]))
    model.forward_cached(ids, *args, model.new_kv_cache(1, 8))  # builds the decode weights
    source = make_model(seed=16, tie_word_embeddings=False)
    for name, tensor in source.hf_state_dict():
        model.load_hf_state_dict([(name, tensor)], strict=False)
        got = model.forward_cached(ids, *args, model.new_kv_cache(1, 8), all_logits=True)
        assert (got[0] - full_logits(model, ids[0])).abs().max().item() < 1e-5, name
    assert (got[0] - full_logits(source, ids[0])).abs().max().item() < 1e-5


def test_a_run_of_slots_is_read_as_a_view_and_gives_the_same_logits() -> None:
    """Rows in consecutive ascending slots read the cache through a slice (no gather); any
    other order gathers. Both must equal the uncached path."""
    from models.batching import CacheBatch

    def first(slots: list[int]) -> int | None:
        n = len(slots)
        t = torch.tensor(slots)
        return CacheBatch.build(
            t, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long), 1, 8
        ).first_slot

    assert first([2, 3, 4]) == 2 and first([5]) == 5
    assert first([3, 2]) is None and first([0, 2]) is None and first([1, 1]) is None
    model = make_model(seed=14)
    seqs = [torch.randint(0, 128, (6,)) for _ in range(3)]
    ref = [full_logits(model, s) for s in seqs]
    for slots in ([2, 3, 4], [4, 2, 3]):
        cache = model.new_kv_cache(5, 8)
        t = torch.tensor(slots)
        model.forward_cached(
            _rows(seqs, [0] * 3, [5] * 3),
            t,
            torch.zeros(3, dtype=torch.long),
            torch.full((3,), 5),
            cache,
        )
        last = model.forward_cached(
            _rows(seqs, [5] * 3, [1] * 3),
            t,
            torch.full((3,), 5),
            torch.ones(3, dtype=torch.long),
            cache,
        )
        for i in range(3):
            assert (last[i] - ref[i][-1]).abs().max().item() < 1e-5, (slots, i)
