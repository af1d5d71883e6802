"""R3 in the torch backend: the trainer forces the engine's experts, so with identical weights
its logprobs equal the engine's even where its own router would choose otherwise.

The near-tie is forced by moving the trainer's `e_score_correction_bias` (selection only: the
gate weights of chosen experts are the same unbiased scores), so its own top-k differs from
the engine's on many tokens while every weight that computes a logprob is identical.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from buffer.codec import decode_group, encode_group
from buffer.episode import EpisodeGroup
from models import RoutingCapture
from rollout.embedded import EmbeddedEngine
from rollout.single_turn import generate_group
from rollout.types import SamplingParams
from tests.rollout.engine_helpers import tiny_model
from tests.trainer.toy import backend
from trainer.batch import build_rl_step

torch.set_num_threads(1)

PROMPTS = [[5, 17, 3, 88, 42, 7], [9, 1, 60], [33, 34, 35, 36, 37, 2, 12, 70]]
TOL = 1e-4  # engine (cached, batched) vs trainer (packed) logprobs in fp32: ~1e-6 apart


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def rollout_groups(model, *, from_prompt: bool) -> list[EpisodeGroup]:
    """Sampled groups (4 samples per prompt) with the engine's experts, through the codec."""
    engine = EmbeddedEngine(copy.deepcopy(model), eos_token_ids=[], context_len=64, seed=0)
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, sampling_seed=5)
    groups = []
    try:
        for i, prompt in enumerate(PROMPTS):
            start = 0 if from_prompt else len(prompt)
            episodes = asyncio.run(
                generate_group(engine, prompt, sampling, 4, metadata={}, routed_experts_from=start)
            )
            groups.append(decode_group(encode_group(EpisodeGroup(f"p{i}", episodes))))
    finally:
        engine.shutdown()
    return groups


def perturbed(model):
    """The same weights; the selection bias moved so the router's own top-k changes."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    for block in other.moe_blocks():
        bias = block.gate.e_score_correction_bias
        bias.add_(torch.randn(bias.shape, generator=gen) * 0.3)
    return other


def max_trainable_diff(batches, logprobs) -> float:
    return max(
        float(((lp - b.rollout_logprobs).abs() * b.loss_mask).max())
        for b, lp in zip(batches, logprobs, strict=True)
    )


def own_choice_differs(model, batches) -> float:
    """Fraction of engine-routed rows where `model`'s own router picks other experts."""
    differ = total = 0
    for b in batches:
        capture = RoutingCapture()
        with torch.no_grad():
            model.forward_packed(b.input_ids, b.cu_seqlens, routing=capture)
        engine = b.routed_experts
        routed = (engine >= 0).all(dim=-1)
        differ += int(((capture.routed_experts != engine).any(-1) & routed).sum())
        total += int(routed.sum())
    return differ / total


def test_r3_logprobs_equal_the_engines_where_the_router_would_differ(model):
    groups = rollout_groups(model, from_prompt=True)
    trainer_model = perturbed(model)
    algo = {"moe": {"routing_replay": "rollout", "replay_prompt_routing": True}}
    step = build_rl_step(groups, micro_batch_tokens=256, rollout_routing=True, prompt_routing=True)
    engine_rows = [b.routed_experts.clone() for b in step.micro_batches]
    assert own_choice_differs(trainer_model, step.micro_batches) > 0.2  # a real near-tie
    r3 = backend(trainer_model, {}, algo).logprobs(step.micro_batches)
    assert max_trainable_diff(step.micro_batches, r3) < TOL
    for b, rows in zip(step.micro_batches, engine_rows, strict=True):
        routed = (rows >= 0).all(dim=-1)  # the pass used exactly the engine's experts there
        assert torch.equal(b.routed_experts[routed], rows[routed])
        assert (b.routed_experts >= 0).all()  # and its own where the engine sent none
    # the same perturbed trainer without R3 (R2's logprob pass routes by itself) disagrees
    r2_step = build_rl_step(groups, micro_batch_tokens=256)
    r2 = backend(trainer_model, {}, {"moe": {"routing_replay": "trainer"}})
    assert max_trainable_diff(r2_step.micro_batches, r2.logprobs(r2_step.micro_batches)) > 1e-2


def test_r3_response_only_by_default(model):
    """Response-only routing: the trainer routes the prompt itself (same weights, same bias:
    the same choice), every later token's logprob runs on the engine's experts."""
    groups = rollout_groups(model, from_prompt=False)
    step = build_rl_step(groups, micro_batch_tokens=256, rollout_routing=True)
    # prompt rows an episode brought are dropped unless prompt_routing (the config's flag)
    with_prompt = build_rl_step(
        rollout_groups(model, from_prompt=True), micro_batch_tokens=256, rollout_routing=True
    )
    for b in with_prompt.micro_batches:
        in_prompt = torch.arange(b.num_tokens) - b.cu_seqlens[b.seq_ids] < b.prompt_lens[b.seq_ids]
        assert (b.routed_experts[:, in_prompt] == -1).all()
    tb = backend(copy.deepcopy(model), {}, {"moe": {"routing_replay": "rollout"}})
    assert max_trainable_diff(step.micro_batches, tb.logprobs(step.micro_batches)) < TOL
    for b in step.micro_batches:
        starts = b.cu_seqlens[:-1] + b.prompt_lens
        replayed = b.routing_replayed
        assert not replayed[starts].any()  # the first response token follows the prompt
        response = b.loss_mask > 0
        response[starts] = False
        assert replayed[response].all()


def test_r3_training_pass_replays_the_engines_experts(model):
    """First step on fresh weights: the training forward forces the same experts as the
    logprob pass, so the PPO ratio is 1 and the mismatch is round-off, where R2 on the same
    perturbed trainer sees the router's disagreement as mismatch."""
    groups = rollout_groups(model, from_prompt=True)
    for g in groups:
        for i, e in enumerate(g.episodes):
            e.reward = float(i % 2)
    algo = {
        "advantage": "grpo",
        "moe": {"routing_replay": "rollout", "replay_prompt_routing": True},
    }
    step = build_rl_step(groups, micro_batch_tokens=256, rollout_routing=True, prompt_routing=True)
    r3 = backend(perturbed(model), {"lr": 1e-4}, algo).train(step)
    assert r3["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert r3["mismatch_abs_diff"] < 1e-5
    r2_algo = {"advantage": "grpo", "moe": {"routing_replay": "trainer"}}
    r2_step = build_rl_step(groups, micro_batch_tokens=256)
    r2 = backend(perturbed(model), {"lr": 1e-4}, r2_algo).train(r2_step)
    assert r2["mismatch_abs_diff"] > 100 * r3["mismatch_abs_diff"] + 1e-3
