"""DecodeWeights.refresh: a weight update written into the existing decode weights (same object,
same tensors) gives exactly what a fresh DecodeWeights.build of the updated model gives: every
tensor equal, and equal logits and greedy tokens on the batch-1 and the batched decode paths."""

from __future__ import annotations

import pytest
import torch

from configs.services import LORA_TARGETS, LoraConfig
from models import build_weight_update
from models.decode_weights import DecodeLayer, DecodeWeights
from models.fp8 import quantize_model_
from models.lora import attach_lora
from models.weight_update import WeightUpdate, apply_weight_update
from rollout.embedded.weights import load_in_place
from tests.models.glm_helpers import make_model

torch.set_num_threads(1)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]


def _lora_update(version: int, seed: int) -> WeightUpdate:
    """An adapter-only update (merged onto the receiver's kept base) on every target kind."""
    source = make_model(seed=seed)
    lora = attach_lora(source, LoraConfig(rank=4, alpha=8.0, target_modules=list(LORA_TARGETS)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return build_weight_update(lora.sync_tensors(), version, dtype=torch.float32)


def _updates() -> list[WeightUpdate]:
    full = [make_model(seed=s).hf_state_dict for s in (31, 32, 33)]
    return [
        build_weight_update(full[0](), 1, dtype=torch.float32),
        _lora_update(2, seed=34),
        build_weight_update(full[1](), 3, dtype=torch.bfloat16),
        build_weight_update(full[2](), 4, fp8_block=(32, 32), dtype=torch.float32),
        _lora_update(5, seed=35),
    ]


def _assert_same(live: DecodeWeights, fresh: DecodeWeights) -> None:
    for name in ("embed", "norm", "lm_head"):
        assert torch.equal(getattr(live, name), getattr(fresh, name)), name
    for i, (a, b) in enumerate(zip(live.layers, fresh.layers, strict=True)):
        for name in DecodeLayer.__dataclass_fields__:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), (i, name)
            elif name == "router_bias":
                assert x == y, (i, name)
        if a.bank is not None:
            assert all(torch.equal(x, y) for x, y in zip(a.bank, b.bank)), i


def _greedy(model, weights: DecodeWeights, prompts: list[list[int]], n: int = 4):
    """Logits [B, V] of every step (prefill, then n one-token steps) and the greedy tokens."""
    b = len(prompts)
    cache = model.new_kv_cache(b, 16)
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    lengths = [len(p) for p in prompts]
    logits = [model.forward_cached(ids, list(range(b)), [0] * b, lengths, cache, weights=weights)]
    tokens = [logits[-1].argmax(-1)]
    for step in range(n):
        start = [n0 + step for n0 in lengths]
        logits.append(
            model.forward_cached(
                tokens[-1][:, None], list(range(b)), start, [1] * b, cache, weights=weights
            )
        )
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(logits), torch.stack(tokens)


@pytest.mark.parametrize("kind", ["plain", "fp8", "bf16"])
def test_updates_refresh_the_decode_weights_in_place(kind: str) -> None:
    model = make_model(seed=30)
    if kind == "fp8":
        quantize_model_(model, (32, 32))
    elif kind == "bf16":  # a bf16 engine: its decode weights stay bf16 (models/decode_bf16.py)
        model.to_dtype(torch.bfloat16)
    with torch.inference_mode():  # as the engine's first forward builds them
        live = model.decode_weights()
    tensors = [*model.parameters(), *model.buffers()]
    for update in _updates():
        before = _greedy(model, live, PROMPTS[:1])[0]
        load_in_place(model, lambda u=update: apply_weight_update(model, u), tensors)
        assert model.decode_weights() is live  # refreshed, not rebuilt
        fresh = DecodeWeights.build(model, DecodeWeights.key_of(model))
        _assert_same(live, fresh)
        for prompts in (PROMPTS[:1], PROMPTS):  # batch 1 (one-token path), batched
            got, want = _greedy(model, live, prompts), _greedy(model, fresh, prompts)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert not torch.equal(before, _greedy(model, live, PROMPTS[:1])[0])


def test_a_replaced_tensor_is_not_refreshed_but_rebuilt() -> None:
    model = make_model(seed=36)
    live = model.decode_weights()
    qkv = live.layers[0].qkv.clone()
    with torch.no_grad():  # a new tensor, not an in-place write: the old views are stale
        proj = model.model.layers[0].self_attn.q_proj
        proj.weight = torch.nn.Parameter(proj.weight * 2)
    assert not live.refresh(model)
    assert torch.equal(live.layers[0].qkv, qkv)  # nothing written
    rebuilt = model.decode_weights()
    assert rebuilt is not live
    _assert_same(rebuilt, DecodeWeights.build(model, DecodeWeights.key_of(model)))


def test_a_failing_load_still_marks_the_weights_changed() -> None:
    model = make_model(seed=37)
    live = model.decode_weights()
    source = make_model(seed=38)
    named = [*source.hf_state_dict()][:3] + [("no.such.weight", torch.zeros(1))]

    with pytest.raises(ValueError):
        load_in_place(model, lambda: model.load_hf_state_dict(named, strict=False))
    assert live.key != DecodeWeights.key_of(model)  # the versions moved
    assert model.decode_weights() is live  # refreshed with what the load wrote
    fresh = DecodeWeights.build(model, DecodeWeights.key_of(model))
    _assert_same(live, fresh)
