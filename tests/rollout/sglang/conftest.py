"""Fixtures for the SGLang backend tests: the SGLang environment (skip with the reason when it
is absent), a tiny GLM-4-MoE checkpoint saved by transformers' `save_pretrained` from the main
environment (random weights, fp32, a locally trained GLM-style tokenizer), our own model of the
same weights as the numerical reference, and helpers for updates and reference outputs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.checkpoint import from_pretrained
from models.glm4moe import Glm4MoeForCausalLM
from models.weight_update import WeightUpdate, build_weight_update
from rollout.sglang.environment import SGLangEnvironment, find

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "12 + 35 = 47, 8 * 9 = 72, 100 - 1 = 99",
    "<|user|> what is 2 + 2? <|assistant|> 4",
    "countdown: reach 24 with 3 4 6 8",
] * 20
PROMPTS = [[11, 12, 13, 14], [40, 41, 42], [7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="session")
def sglang_env() -> SGLangEnvironment:
    """PHYSARUM_SGLANG_PYTHON names another interpreter; default <repo>/.venv-sglang."""
    env, reason = find(os.environ.get("PHYSARUM_SGLANG_PYTHON") or None)
    if env is None:
        print(f"SGLang tests skipped: {reason}")
        pytest.skip(f"SGLang environment unavailable: {reason}")
    return env


def _save_hf_glm4moe(out: Path, vocab_size: int) -> None:
    """A tiny transformers Glm4MoeForCausalLM (random, larger init so greedy outputs vary,
    nonzero e_score_correction_bias, untied lm_head), saved with save_pretrained in fp32."""
    from transformers import Glm4MoeConfig
    from transformers import Glm4MoeForCausalLM as HFGlm4Moe

    torch.manual_seed(0)
    cfg = Glm4MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=512,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        tie_word_embeddings=False,
        initializer_range=0.15,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    model = HFGlm4Moe(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
    model.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_glm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tokenizer import build_toy_tokenizer

    out = tmp_path_factory.mktemp("tiny_glm4moe")
    tokenizer = build_toy_tokenizer(out, CORPUS, vocab_size=300)
    _save_hf_glm4moe(out, vocab_size=len(tokenizer))
    return out


@pytest.fixture(scope="session")
def reference_model(tiny_glm_dir: Path) -> Glm4MoeForCausalLM:
    torch.set_num_threads(1)
    return from_pretrained(tiny_glm_dir, dtype=torch.float32).eval()


def perturbed(
    model: Glm4MoeForCausalLM, seed: int, scale: float = 0.05
) -> list[tuple[str, torch.Tensor]]:
    """Every HF-named weight of `model` plus N(0, scale) noise (the model is not changed)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (name, t.detach().float() + scale * torch.randn(t.shape, generator=gen))
        for name, t in model.hf_state_dict()
    ]


def make_update(
    named: list[tuple[str, torch.Tensor]], version: int, *, bucket_bytes: int = 64 * 1024
) -> WeightUpdate:
    """fp32 buckets (small, so an update spans several buckets)."""
    return build_weight_update(named, version, bucket_bytes=bucket_bytes, dtype=torch.float32)


def model_with(named: list[tuple[str, torch.Tensor]], like: Glm4MoeForCausalLM):
    """A copy of `like` loaded with `named` (the reference for a pushed update)."""
    model = from_pretrained_like(like)
    model.load_hf_state_dict(named, strict=True)
    return model.eval()


def from_pretrained_like(like: Glm4MoeForCausalLM) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(like.config)
    model.load_hf_state_dict(list(like.hf_state_dict()), strict=True)
    return model


@torch.no_grad()
def greedy_reference(model: Glm4MoeForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full (uncached) forwards of our model."""
    seq = list(prompt)
    for _ in range(n):
        out = model.forward_packed(torch.tensor(seq), torch.tensor([0, len(seq)]))
        seq.append(int(model.lm_head(out.hidden[-1]).argmax()))
    return seq[len(prompt) :]


# SGLang's kernels are another backend: its logits differ from ours by up to ~1e-4 (see the
# logprob tolerance), so where our top two logits are closer than GREEDY_TIE either token is a
# correct greedy choice, on any CPU; exact equality with greedy_reference would hinge on that.
GREEDY_TIE = 1e-3


@torch.no_grad()
def assert_greedy(model: Glm4MoeForCausalLM, prompt: list[int], output: list[int], n: int):
    """`output` (n tokens) is a greedy continuation of `prompt` under `model`: teacher-forced on
    `output` itself, every token's logit is within GREEDY_TIE of that step's maximum."""
    assert len(output) == n, (prompt, output)
    ids = torch.tensor(prompt + output)
    hidden = model.forward_packed(ids, torch.tensor([0, len(ids)])).hidden
    logits = model.lm_head(hidden[len(prompt) - 1 : -1]).float()  # [n, V]
    short = logits.max(-1).values - logits.gather(1, torch.tensor(output)[:, None]).squeeze(1)
    assert float(short.max()) <= GREEDY_TIE, (prompt, output, short.tolist())


@torch.no_grad()
def reference_logprobs(model: Glm4MoeForCausalLM, prompt: list[int], output: list[int]):
    ids = torch.tensor(prompt + output)
    lp = model.token_logprobs(ids, torch.tensor([0, len(ids)])).logprobs
    return lp[len(prompt) :]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("sglang_run")
