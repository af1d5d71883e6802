"""The trainer -> rollout weight-update message: bucketing, codec, apply to plain/FP8 models."""

from __future__ import annotations

import pytest
import torch

from models import (
    apply_weight_update,
    build_weight_update,
    decode_weight_update,
    encode_weight_update,
    iter_bucket_tensors,
    quantize_model_,
)
from models.fp8 import Fp8ExpertBank, Fp8Linear
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)


def test_build_encode_decode_round_trip() -> None:
    source = make_model(seed=40, tie_word_embeddings=False)
    named = list(source.hf_state_dict())
    update = build_weight_update(named, version=7, bucket_bytes=20_000, dtype=torch.bfloat16)
    assert update.version == 7 and update.fp8_block is None and len(update.buckets) > 5
    for b in update.buckets[:-1]:  # only a single oversized tensor may exceed the budget
        assert b.nbytes <= 20_000 or len(b.names) == 1
    got = [(n, t) for b in update.buckets for n, t in iter_bucket_tensors(b)]
    assert [n for n, _ in got] == [n for n, _ in named]
    for (name, t), (_, src) in zip(got, named):
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and torch.equal(t, src)
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, src.to(torch.bfloat16))
    # views, not copies
    name, view = next(iter_bucket_tensors(update.buckets[0]))
    assert view.untyped_storage().data_ptr() == update.buckets[0].payload.data_ptr()
    data = encode_weight_update(update)
    raw = sum(t.numel() * t.element_size() for _, t in got)
    assert len(data) < raw * 1.05 + 16_384  # compact: payload plus a small header
    for blob in (data, bytearray(data)):
        back = decode_weight_update(blob)
        assert back.version == 7 and len(back.buckets) == len(update.buckets)
        for b1, b2 in zip(update.buckets, back.buckets):
            assert b1.names == b2.names and b1.shapes == b2.shapes and b1.dtypes == b2.dtypes
            assert torch.equal(b1.payload, b2.payload)
    with pytest.raises(ValueError, match="magic"):
        decode_weight_update(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="truncated"):
        decode_weight_update(data[: len(data) // 2])


def test_apply_bf16_update_to_plain_model() -> None:
    source = make_model(seed=41)
    target = make_model(seed=42)
    ids = torch.randint(0, 128, (9,))
    assert (full_logits(source, ids) - full_logits(target, ids)).abs().max() > 1e-3
    update = build_weight_update(source.hf_state_dict(), 1, dtype=torch.float32)
    apply_weight_update(target, decode_weight_update(encode_weight_update(update)))
    assert torch.equal(full_logits(target, ids), full_logits(source, ids))
    # a subset (one bucket) is a valid update; the rest stays
    part = build_weight_update(
        [(n, t * 0) for n, t in source.hf_state_dict() if "layers.0.self_attn.v_proj" in n], 2
    )
    apply_weight_update(target, part)
    assert target.model.layers[0].self_attn.v_proj.weight.abs().max() == 0


def test_fp8_update_into_fp8_and_plain_models() -> None:
    source = make_model(seed=43, tie_word_embeddings=False)
    update = build_weight_update(
        source.hf_state_dict(), 3, fp8_block=(32, 32), bucket_bytes=8_000, dtype=torch.bfloat16
    )
    assert update.fp8_block == (32, 32)
    for b in update.buckets:  # every FP8 weight travels with its scale, in the same bucket
        for n, dt in zip(b.names, b.dtypes):
            if dt == "float8_e4m3fn":
                assert n + "_scale_inv" in b.names
    dtypes = {n: dt for b in update.buckets for n, dt in zip(b.names, b.dtypes)}
    assert dtypes["model.layers.1.mlp.experts.0.gate_proj.weight"] == "float8_e4m3fn"
    assert dtypes["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"] == "float32"
    assert dtypes["model.layers.1.mlp.gate.weight"] == "bfloat16"
    assert dtypes["lm_head.weight"] == "bfloat16"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "float32"
    update = decode_weight_update(encode_weight_update(update))

    fp8_target = quantize_model_(make_model(seed=44, tie_word_embeddings=False), (32, 32))
    apply_weight_update(fp8_target, update)
    plain_target = make_model(seed=45, tie_word_embeddings=False)
    apply_weight_update(plain_target, update)
    # the reference: the source's linears quantized from fp32, every other parameter (embedding,
    # norms, router, lm_head) rounded to bf16; the router bias exact
    expected = quantize_model_(make_model(seed=43, tie_word_embeddings=False), (32, 32))
    with torch.no_grad():
        for p in expected.parameters():
            p.copy_(p.to(torch.bfloat16))
    ids = torch.randint(0, 128, (10,))
    ref = full_logits(expected, ids)
    assert torch.equal(full_logits(fp8_target, ids), ref)
    assert isinstance(fp8_target.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert (full_logits(plain_target, ids) - ref).abs().max().item() < 1e-5


def test_dense_update_into_fp8_model_is_quantized_and_block_mismatch_requantizes() -> None:
    source = make_model(seed=47)
    target = quantize_model_(make_model(seed=48), (32, 32))
    apply_weight_update(target, build_weight_update(source.hf_state_dict(), 1, dtype=torch.float32))
    expected = quantize_model_(make_model(seed=47), (32, 32))
    ids = torch.randint(0, 128, (8,))
    assert torch.equal(full_logits(target, ids), full_logits(expected, ids))
    assert isinstance(target.moe_blocks()[0].experts, Fp8ExpertBank)
    # FP8 pairs with another block size are dequantized and requantized to the target's
    other = build_weight_update(source.hf_state_dict(), 2, fp8_block=(16, 16), dtype=torch.float32)
    apply_weight_update(target, other)
    diff = (full_logits(target, ids) - full_logits(expected, ids)).abs().max().item()
    assert 0 < diff < 0.05
    with pytest.raises(ValueError, match="without their pair"):
        lonely = [(n, t) for b in other.buckets for n, t in iter_bucket_tensors(b)]
        target.load_hf_state_dict(
            [x for x in lonely if not x[0].endswith("_scale_inv")], strict=False
        )


def test_pickled_bucket_payload_travels_out_of_band_and_loads_as_a_view() -> None:
    """Protocol 5 (what Ray's object store uses): the payload is one out-of-band buffer, not
    pickled bytes, and unpickling from that buffer gives a tensor over the same memory."""
    import pickle

    source = make_model(seed=41, tie_word_embeddings=False)
    update = build_weight_update(source.hf_state_dict(), version=3, fp8_block=(128, 128))
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    assert [memoryview(b).nbytes for b in buffers] == [b.nbytes for b in update.buckets]
    assert len(data) < 64 * 1024 < update.nbytes  # the header only: names, shapes, offsets
    got = pickle.loads(data, buffers=buffers)
    assert got.version == 3 and got.fp8_block == (128, 128)
    for sent, back in zip(update.buckets, got.buckets):
        # a view of the received buffer (here: the sender's own memory), not a copy
        assert back.payload.data_ptr() == sent.payload.data_ptr()
        assert (back.names, back.shapes, back.dtypes) == (sent.names, sent.shapes, sent.dtypes)
    in_band = pickle.loads(pickle.dumps(update, protocol=4))  # older protocols: a copy
    for (n, t), (_, u) in zip(iter_bucket_tensors(in_band.buckets[0]), named(update)):
        assert t.dtype == u.dtype and torch.equal(t.view(torch.uint8), u.view(torch.uint8)), n
    target = quantize_model_(make_model(seed=42, tie_word_embeddings=False))
    apply_weight_update(target, got)  # an FP8 update loads from the received views
    ids = torch.tensor([3, 9, 27, 1, 5])
    assert torch.equal(full_logits(target, ids), full_logits(_fp8_loaded(update), ids))


def named(update):
    return [kv for b in update.buckets for kv in iter_bucket_tensors(b)]


def _fp8_loaded(update):
    model = quantize_model_(make_model(seed=43, tie_word_embeddings=False))
    apply_weight_update(model, update)
    return model


def test_update_through_ray_object_store_is_read_zero_copy() -> None:
    """ray.put / ray.get of a WeightUpdate: every get of the object is a view of the same
    shared-memory store object (torch's own pickling would copy it on every get), and its
    tensors are the sender's."""
    import ray

    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=1, include_dashboard=False, namespace="test_weight_update")
    try:
        source = make_model(seed=44, tie_word_embeddings=False)
        update = build_weight_update(source.hf_state_dict(), version=5, dtype=torch.bfloat16)
        ref = ray.put(update)
        first, second = ray.get(ref), ray.get(ref)
        for a, b, sent in zip(first.buckets, second.buckets, update.buckets):
            assert a.payload.data_ptr() == b.payload.data_ptr() != sent.payload.data_ptr()
            assert torch.equal(a.payload, sent.payload)
        assert first.version == 5
    finally:
        if owned:
            ray.shutdown()
