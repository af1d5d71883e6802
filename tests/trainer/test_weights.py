"""Weight export for the rollout engines: HF names, buckets of a configured size, FP8 option."""

from __future__ import annotations

import torch

from models import apply_weight_update, is_quantized_name
from tests.trainer.toy import backend, grpo_step, toy_model


def _trained(toy_tokenizer, bucket_mb: int):
    model = toy_model(len(toy_tokenizer), seed=7)
    tb = backend(model, {"weight_bucket_mb": bucket_mb}, {"moe": {"bias_update_rate": 0.01}})
    tb.train(grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=7))
    return tb


def test_export_weights_are_the_hf_tensors_of_the_trained_model(toy_tokenizer):
    tb = _trained(toy_tokenizer, bucket_mb=1)
    exported = dict(tb.export_weights())
    assert set(exported) == {name for name, _ in tb.model.hf_state_dict()}
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in exported
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in exported
    bias = exported["model.layers.1.mlp.gate.e_score_correction_bias"]
    torch.testing.assert_close(bias, tb.model.moe_blocks()[0].gate.e_score_correction_bias)
    torch.testing.assert_close(
        exported["model.embed_tokens.weight"], tb.model.model.embed_tokens.weight
    )


def test_weight_update_buckets_carry_the_version_and_load_into_an_engine_model(toy_tokenizer):
    tb = _trained(toy_tokenizer, bucket_mb=1)
    update = tb.weight_update()
    assert update.version == tb.version == 1
    total = sum(t.numel() * t.element_size() for _, t in tb.export_weights())
    assert len(update.buckets) >= total // 2**20  # 1 MiB buckets: several of them
    assert all(b.nbytes <= 2**20 for b in update.buckets if len(b.names) > 1)
    engine = toy_model(len(toy_tokenizer), seed=99)  # different weights before the update
    apply_weight_update(engine, update)
    ids = torch.tensor([1, 2, 4, 30, 31, 17, 5, 205])
    cu = torch.tensor([0, 8])
    with torch.no_grad():
        want = tb.model.token_logprobs(ids, cu).logprobs
        got = engine.token_logprobs(ids, cu).logprobs
    torch.testing.assert_close(got, want)  # fp32 export: exact weights


def test_fp8_weight_update_quantises_linear_weights_only(toy_tokenizer):
    tb = _trained(toy_tokenizer, bucket_mb=512)
    update = tb.weight_update(version=5, fp8_block=(128, 128))
    assert update.version == 5 and update.fp8_block == (128, 128)
    dtypes = {n: d for b in update.buckets for n, d in zip(b.names, b.dtypes, strict=True)}
    for name, dtype in dtypes.items():
        if name.endswith("_scale_inv"):
            assert name.removesuffix("_scale_inv") in dtypes
        elif is_quantized_name(name):
            assert "float8" in str(dtype), name
        else:
            assert "float8" not in str(dtype), name
    assert any(n.endswith("self_attn.q_proj.weight_scale_inv") for n in dtypes)
