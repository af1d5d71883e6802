"""The trainer's cheaper per-step paths give the numbers of the paths they replace:
gradient clipping that skips the scaling pass when nothing is clipped, the export's cached
HF views, and a step of one micro-batch that takes its statistics without merging them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.trainer.toy import backend, grpo_step, toy_model
from trainer.forensics import _BatchView
from trainer.optim import clip_grad_norm


def _params_with_grads(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(4, 3), (5,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    params.append(torch.nn.Parameter(torch.ones(2)))  # no gradient: left out, as torch does
    return params


@pytest.mark.parametrize("scale", [0.01, 100.0, math.nan])
@pytest.mark.parametrize("max_norm", [1.0, math.inf])
def test_clip_grad_norm_matches_torch(scale: float, max_norm: float) -> None:
    ours, theirs = _params_with_grads(scale), _params_with_grads(scale)
    norm = clip_grad_norm(ours, max_norm)
    with_grads = [p for p in theirs if p.grad is not None]  # as the backend called it
    want = torch.nn.utils.clip_grad_norm_(with_grads, max_norm, foreach=True)
    torch.testing.assert_close(norm, want, equal_nan=True, rtol=0, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)


def test_cached_export_views_follow_training_and_loads(toy_tokenizer) -> None:
    tb = backend(toy_model(len(toy_tokenizer), seed=3), {}, {"moe": {"bias_update_rate": 0.01}})
    first = dict(tb.export_weights())
    tb.train(grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=1))
    cached = dict(tb.export_weights())
    fresh = {name: t.detach() for name, t in tb.model.hf_state_dict()}
    assert list(cached) == list(fresh) and set(first) == set(fresh)
    for name, tensor in fresh.items():  # the trained values, not the first export's
        assert torch.equal(cached[name], tensor), name
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert not torch.equal(cached[bias], torch.zeros_like(cached[bias]))
    # a parameter replaced by a new tensor (not written in place) rebuilds the views
    embed = tb.model.model.embed_tokens
    embed.weight = torch.nn.Parameter(embed.weight.detach() + 1.0)
    rebuilt = dict(tb.export_weights())
    assert torch.equal(rebuilt["model.embed_tokens.weight"], embed.weight.detach())


def test_one_micro_batch_step_matches_the_same_step_split_in_two(toy_tokenizer) -> None:
    model = toy_model(len(toy_tokenizer), seed=5)
    whole, split = backend(copy.deepcopy(model)), backend(copy.deepcopy(model))
    one = grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=2)
    tokens = sum(b.num_tokens for b in one.micro_batches)
    two = grpo_step(
        toy_tokenizer, n_prompts=2, n_samples=4, seed=2, micro_batch_tokens=tokens // 2 + 8
    )
    assert len(one.micro_batches) == 1 and len(two.micro_batches) >= 2
    got, want = whole.train(one), split.train(two)
    for name in ("loss", "pg_loss", "entropy", "mismatch_k3", "ratio_max", "tokens", "grad_norm"):
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("share", [False, True])
def test_forensics_numpy_episode_index_matches_the_batch(toy_tokenizer, share: bool) -> None:
    step = grpo_step(toy_tokenizer, n_prompts=3, n_samples=4, seed=4, share_prompt_prefix=share)
    for b in step.micro_batches:
        b.train_logprobs = torch.zeros(b.num_tokens)
        view = _BatchView(b, b.train_logprobs, torch.zeros(b.num_tokens))
        for seq in range(b.num_seqs):
            assert view.episode_index(seq).tolist() == b.episode_index(seq).tolist()
