"""The kept export layout (trainer/export_plan.py): each version's update is byte for byte
what build_weight_update makes of the weights at that moment, in a payload of its own."""

from __future__ import annotations

import torch

from models.weight_update import WeightUpdate, build_weight_update
from tests.trainer.toy import backend, grpo_step, toy_model


def _built(tb, dtype: torch.dtype | None = None) -> WeightUpdate:
    return build_weight_update(
        tb.export_weights(),
        tb.version,
        bucket_bytes=tb.cfg.weight_bucket_mb * 2**20,
        dtype=dtype or tb.model.dtype,
    )


def _assert_same(a: WeightUpdate, b: WeightUpdate) -> None:
    assert a.version == b.version and a.fp8_block == b.fp8_block
    assert len(a.buckets) == len(b.buckets)
    for x, y in zip(a.buckets, b.buckets, strict=True):
        assert (x.names, x.shapes, x.dtypes, x.offsets) == (y.names, y.shapes, y.dtypes, y.offsets)
        assert torch.equal(x.payload, y.payload)


def test_kept_layout_matches_a_fresh_build_after_each_step(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=7)
    tb = backend(model, {"weight_bucket_mb": 1}, {"moe": {"bias_update_rate": 0.01}})
    first = tb.weight_update()  # plans the layout
    _assert_same(first, _built(tb))
    held = first.buckets[0].payload.clone()
    for seed in range(3):
        tb.train(grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=seed))
        update = tb.weight_update()
        assert tb._export_plan._buckets is not None  # the kept layout served it
        _assert_same(update, _built(tb))
    assert len(update.buckets) > 1  # 1 MiB buckets: several
    assert torch.equal(first.buckets[0].payload, held)  # an older update is not rewritten
    other = tb.weight_update()
    assert other.buckets[0].payload.data_ptr() != update.buckets[0].payload.data_ptr()


def test_converted_and_fp8_exports_take_the_general_path(toy_tokenizer):
    tb = backend(toy_model(len(toy_tokenizer), seed=3))
    for _ in range(2):  # a second call with the same layout does not plan it again
        update = tb.weight_update(dtype=torch.bfloat16)
        assert tb._export_plan._buckets is None
        _assert_same(update, _built(tb, torch.bfloat16))
    fp8 = tb.weight_update(fp8_block=(16, 16))
    assert fp8.fp8_block == (16, 16)
    assert any(n.endswith("_scale_inv") for b in fp8.buckets for n in b.names)
    _assert_same(tb.weight_update(), _built(tb))  # back to the model's dtype: kept again
    assert tb._export_plan._buckets is not None


def test_a_dropped_payload_is_refilled_and_a_held_one_never(toy_tokenizer):
    """An update nobody holds (Ray pickled it and let go) lends its payload's memory to the
    next one; any holder (the update, a view of a tensor in it, its pickled numpy form while
    alive) keeps its bytes."""
    import pickle

    from models.weight_update import iter_bucket_tensors

    tb = backend(toy_model(len(toy_tokenizer), seed=5), {"weight_bucket_mb": 1})
    tb.weight_update()  # plans the layout
    update = tb.weight_update()
    ptrs = [b.payload.data_ptr() for b in update.buckets]
    blob = pickle.dumps(update, protocol=5)
    del update
    tb.train(grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=0))
    refilled = tb.weight_update()
    assert [b.payload.data_ptr() for b in refilled.buckets] == ptrs
    _assert_same(refilled, _built(tb))
    assert not torch.equal(pickle.loads(blob).buckets[0].payload, refilled.buckets[0].payload)
    _, view = next(iter_bucket_tensors(refilled.buckets[0]))
    kept = view.clone()
    del refilled
    tb.train(grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=1))
    fresh = tb.weight_update()  # the view still holds bucket 0's payload: a new one
    assert fresh.buckets[0].payload.data_ptr() != ptrs[0]
    assert torch.equal(view, kept)
    _assert_same(fresh, _built(tb))
