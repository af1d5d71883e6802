"""Parity with transformers' Glm4MoeForCausalLM: full prefill and step-by-step cached decode."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.models.glm_helpers import full_logits, make_model, to_hf

torch.set_num_threads(1)
log = logging.getLogger(__name__)

CONFIGS = {
    "tiny-default": {},
    # grouped routing, no normalisation, scaling, untied head, q/k/v biases, k=3
    "grouped-unnormed": dict(
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        routed_scaling_factor=2.5,
        tie_word_embeddings=False,
        attention_bias=True,
    ),
    # all layers MoE, two shared experts, full rotary, no QK-norm, GQA 4:1, grouping 2/1
    "full-rotary": dict(
        first_k_dense_replace=0,
        n_shared_experts=2,
        partial_rotary_factor=1.0,
        use_qk_norm=False,
        num_key_value_heads=1,
        n_routed_experts=6,
        n_group=2,
        topk_group=1,
        rope_theta=500.0,
    ),
    # GLM-4.6's one MTP layer (model.layers.3): transformers' main model has none and ignores
    # it; the layer's own parity with transformers' MtpModel is in tests/models/test_mtp.py
    "one-mtp-layer": dict(num_nextn_predict_layers=1, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_matches_transformers(name: str) -> None:
    model = make_model(seed=1, **CONFIGS[name])
    hf = to_hf(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    for row in range(2):
        ours = full_logits(model, ids[row])
        assert (ours - ref[row]).abs().max().item() < 1e-5
    # the cached path's prefill (both rows at once) agrees too
    cache = model.new_kv_cache(4, 16)
    cached = model.forward_cached(
        ids, torch.tensor([3, 0]), torch.zeros(2, dtype=torch.long), torch.full((2,), 13), cache,
        all_logits=True,
    )  # fmt: skip
    assert (cached - ref).abs().max().item() < 1e-5
    # routing really differs between tokens (the test would be weak otherwise)
    out = model.forward_packed(ids[0], torch.tensor([0, 13]))
    assert (out.expert_load > 0).sum().item() > model.config.num_experts_per_tok


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decode_matches_transformers(name: str) -> None:
    model = make_model(seed=2, **CONFIGS[name])
    hf = to_hf(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    steps = torch.randint(0, model.config.vocab_size, (1, 8))
    cache = model.new_kv_cache(2, 16)
    slot = torch.tensor([1])
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
        past = out.past_key_values
        ours = model.forward_cached(prompt, slot, torch.tensor([0]), torch.tensor([5]), cache)
        assert (ours - out.logits[:, -1].float()).abs().max().item() < 1e-5
        for i in range(steps.shape[1]):
            tok = steps[:, i : i + 1]
            out = hf(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ours = model.forward_cached(tok, slot, torch.tensor([5 + i]), torch.tensor([1]), cache)
            assert (ours - out.logits[:, -1].float()).abs().max().item() < 1e-5


def test_bf16_difference_is_reported_and_sane() -> None:
    model = make_model(seed=3, **CONFIGS["grouped-unnormed"])
    ids = torch.randint(0, model.config.vocab_size, (17,))
    ref = full_logits(model, ids)
    hf = to_hf(model).to(torch.bfloat16)
    ours = make_model(seed=3, **CONFIGS["grouped-unnormed"]).to_dtype(torch.bfloat16)
    assert ours.moe_blocks()[0].gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        hf_bf16 = hf(ids[None]).logits[0].float()
    ours_bf16 = full_logits(ours, ids)
    vs_hf = (ours_bf16 - hf_bf16).abs().max().item()
    ours_err = (ours_bf16 - ref).abs().max().item()
    hf_err = (hf_bf16 - ref).abs().max().item()
    log.warning(
        "bf16 logits max-abs: ours vs HF bf16 %.4f, ours vs fp32 %.4f, HF vs fp32 %.4f "
        "(logit scale %.2f)",
        vs_hf, ours_err, hf_err, ref.abs().max().item(),
    )  # fmt: skip
    # bf16 has 8 mantissa bits: errors of a few 1e-2 on O(1) logits, same order as HF's own
    assert ours_err < 0.1 and vs_hf < 0.1
    assert ours_err < 3 * hf_err + 1e-2


def test_gradients_match_transformers() -> None:
    """Backward through packed attention, the router and the grouped-GEMM experts equals
    transformers' backward on the same weights (in-memory parameter names coincide)."""
    model = make_model(seed=4, **CONFIGS["grouped-unnormed"]).train()
    hf = to_hf(model).train()
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in (9, 6)]
    target = torch.randn(15, model.config.vocab_size)
    ids, cu = torch.cat(seqs), torch.tensor([0, 9, 15])
    (model.lm_head(model.forward_packed(ids, cu).hidden) * target).sum().backward()
    logits = torch.cat([hf(s[None]).logits[0] for s in seqs])
    (logits * target).sum().backward()
    ours = dict(model.named_parameters())
    checked = 0
    for name, p in hf.named_parameters():
        if p.grad is None:
            continue
        scale = p.grad.abs().max().item() + 1e-6
        assert (ours[name].grad - p.grad).abs().max().item() < 1e-4 * max(scale, 1.0), name
        checked += 1
    assert checked == len(ours)
    assert ours["model.layers.1.mlp.experts.gate_up_proj"].grad.abs().sum() > 0
    assert ours["model.layers.1.mlp.gate.weight"].grad.abs().sum() > 0
