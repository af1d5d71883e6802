"""The per-step caches of the weight path: the HF slot map reused across loads (and rebuilt
when a tensor moves), and the export payload built in one concatenation (same bytes)."""

from __future__ import annotations

import torch

from models import (
    apply_weight_update,
    build_weight_update,
    hf_io,
    iter_bucket_tensors,
    quantize_model_,
)
from models.hf_io import hf_slots
from models.weight_update import ALIGN
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)


def _reference_payload(items: list[tuple[str, torch.Tensor]]) -> bytes:
    """Each tensor's bytes at a 16-byte aligned offset, zero padded: the documented layout."""
    out = bytearray()
    for _, t in items:
        out += t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += b"\0" * (-len(out) % ALIGN)
    return bytes(out)


def test_slot_map_is_reused_and_rebuilt_when_a_tensor_moves() -> None:
    model = make_model(seed=50)
    first = hf_slots(model)
    assert hf_slots(model) is first  # same tensors at the same addresses: reused
    source = make_model(seed=51)
    apply_weight_update(model, build_weight_update(source.hf_state_dict(), 1, dtype=torch.float32))
    assert hf_slots(model) is first  # an in-place load moves nothing
    ids = torch.randint(0, 128, (7,))
    assert torch.equal(full_logits(model, ids), full_logits(source, ids))
    # swap one parameter for a new tensor: the cached slot would write into the old one
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().clone())
    assert hf_slots(model) is not first
    other = make_model(seed=52)
    apply_weight_update(model, build_weight_update(other.hf_state_dict(), 2, dtype=torch.float32))
    assert torch.equal(proj.weight, other.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(full_logits(model, ids), full_logits(other, ids))


def test_slot_map_follows_fp8_quantization() -> None:
    model = make_model(seed=53)
    plain = hf_slots(model)
    quantize_model_(model, block=(32, 32))
    slots = hf_slots(model)
    assert slots is not plain
    name = "model.layers.0.self_attn.q_proj.weight"
    assert hasattr(slots[name], "w8") and not hasattr(plain[name], "w8")


def test_export_payload_bytes_match_the_layout_and_own_their_memory() -> None:
    source = make_model(seed=54)
    odd = torch.arange(5, dtype=torch.float32) + 0.5  # 20 bytes: needs 12 bytes of padding
    named = [("odd.bias", odd), *source.hf_state_dict()]
    for dtype, block in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, (32, 32))):
        update = build_weight_update(named, 3, dtype=dtype, fp8_block=block, bucket_bytes=100_000)
        assert len(update.buckets) > 1
        for bucket in update.buckets:
            items = list(iter_bucket_tensors(bucket))
            assert [n for n, _ in items] == bucket.names
            assert bucket.payload.numpy().tobytes() == _reference_payload(items)
            assert all(off % ALIGN == 0 for off in bucket.offsets)
    update = build_weight_update(named, 4, dtype=torch.float32)
    before = update.buckets[0].payload.clone()
    with torch.no_grad():
        odd.add_(1.0)
        for p in source.parameters():
            p.add_(1.0)
    assert torch.equal(update.buckets[0].payload, before)  # a copy, not a view of the model


def test_export_does_not_cache_views_of_the_exported_tensors() -> None:
    model = make_model(seed=55)
    names = [n for n, _ in model.hf_state_dict()]
    assert model not in hf_io._SLOTS  # an export may run on transient (all-gathered) storage
    assert names == list(hf_slots(model))  # same names, same order as the load's map
    assert model in hf_io._SLOTS
