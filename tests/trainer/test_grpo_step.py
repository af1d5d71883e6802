"""One RL step of the torch backend on the toy model: direction of the update, every parameter
moves, slime's first-step gate, routing replay, PPO epochs, TIS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from buffer.episode import Episode, EpisodeGroup
from models.chat import prompt_ids
from tests.trainer.toy import backend, grpo_step, set_rollout_logprobs, toy_model
from trainer.batch import build_rl_step


def _hand_made_group(tok, rewards):
    """One prompt "3+4=" and four answers "7", "7", "9", "12" with the given rewards."""
    prompt = prompt_ids(tok, [{"role": "user", "content": "3+4="}])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    episodes = []
    for answer, reward in zip(["7", "7", "9", "12"], rewards, strict=True):
        response = [*tok("\n" + answer, add_special_tokens=False)["input_ids"], eos]
        n = len(response)
        episodes.append(
            Episode(prompt, response, np.ones(n), np.zeros(n), np.zeros(n), reward=reward)
        )
    return EpisodeGroup("hand", episodes)


def _sequence_logprobs(tb, step):
    """float [N]: summed response logprobs of each sequence of the step (step order)."""
    out = torch.zeros(step.num_seqs)
    for batch, logp in zip(step.micro_batches, tb.logprobs(step.micro_batches), strict=True):
        out.index_add_(0, batch.sample_index[batch.seq_ids], logp * batch.loss_mask)
    return out


def _answer_token_logprob(tb, step, seq):
    """logprob of the first answer digit (after "\\n") of sequence `seq`."""
    batch = step.micro_batches[0]
    b = int((batch.sample_index == seq).nonzero())
    pos = int(batch.cu_seqlens[b] + batch.prompt_lens[b] + 1)
    return float(tb.logprobs([batch])[0][pos])


def test_grpo_step_moves_logprobs_with_the_advantage_sign(toy_tokenizer):
    for rewards, up, down in [([1.0, 1.0, 0.0, 0.0], [0, 1], [2, 3]),
                              ([0.0, 0.0, 1.0, 1.0], [2, 3], [0, 1])]:  # fmt: skip
        model = toy_model(len(toy_tokenizer), seed=0)
        tb = backend(model, {"lr": 1e-4}, {"advantage": "grpo"})
        step = build_rl_step([_hand_made_group(toy_tokenizer, rewards)], micro_batch_tokens=256)
        before = _sequence_logprobs(tb, step)
        digit_before = [_answer_token_logprob(tb, step, i) for i in (0, 2, 3)]
        tb.prepare(step)
        adv = step.micro_batches[0].advantages
        assert torch.all(
            (adv > 0)
            == (step.micro_batches[0].loss_mask > 0)
            & (
                torch.tensor(rewards)[
                    step.micro_batches[0].sample_index[step.micro_batches[0].seq_ids]
                ]
                > 0
            )
        )
        tb.train_step(step.micro_batches)
        after = _sequence_logprobs(tb, step)
        digit_after = [_answer_token_logprob(tb, step, i) for i in (0, 2, 3)]
        assert torch.all(after[up] > before[up]), (rewards, before, after)
        assert torch.all(after[down] < before[down]), (rewards, before, after)
        sign = 1 if rewards[0] > 0 else -1  # answer "7" is rewarded or penalised
        assert sign * (digit_after[0] - digit_before[0]) > 0
        assert all(-sign * (a - b) > 0 for a, b in zip(digit_after[1:], digit_before[1:]))


def test_every_parameter_and_router_bias_changes_after_a_step(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=1)
    tb = backend(model, {"lr": 1e-3}, {"advantage": "grpo", "moe": {"bias_update_rate": 1e-3}})
    step = grpo_step(toy_tokenizer, n_prompts=8, n_samples=8, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = [b.gate.e_score_correction_bias.clone() for b in model.moe_blocks()]
    tb.train(step)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    for block, old in zip(model.moe_blocks(), biases, strict=True):
        assert not torch.equal(block.gate.e_score_correction_bias, old)


def test_first_step_gate_ratio_one_and_ppo_kl_zero(toy_tokenizer):
    """slime's gate: the recomputed old logprobs equal the training forward's on a fresh run."""
    model = toy_model(len(toy_tokenizer), seed=2)
    algo = {"advantage": "grpo", "tis": {"enabled": True}, "moe": {"routing_replay": True}}
    tb = backend(model, {"ppo_epochs": 2}, algo)
    step = grpo_step(toy_tokenizer, n_prompts=4, n_samples=4, seed=2)
    set_rollout_logprobs(tb, step)
    batches = tb.prepare(step)  # ppo_epochs 2: recomputes old logprobs, captures routing
    assert all(b.old_logprobs is not None and b.routed_experts is not None for b in batches)
    first = tb.train_step(batches)
    # Not bitwise: the old logprobs (no-grad token_logprobs, lm_head on every position) and the
    # training forward (lm_head on the trainable positions only) are different matmul shapes,
    # which the CPU's kernels may round differently; fp32 tolerances cover that.
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert abs(first["ppo_kl"]) < 1e-6 and first["clip_frac"] == 0.0
    # exact: rollout and old logprobs are the same pass (tb.logprobs) on the same batches
    assert first["mismatch_abs_diff"] == 0.0 and first["tis_weight"] == 1.0
    assert first["tis_clip_frac"] == 0.0
    second = tb.train_step(batches)  # same data, the policy has moved: the gate must open
    assert second["ratio_max"] > 1.01 and second["ratio_min"] < 0.99  # far beyond round-off
    assert abs(second["ppo_kl"]) > 1e-3
    assert second["version"] == 2.0


def test_importance_weights_follow_the_rollout_mismatch(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=3)
    algo = {"advantage": "grpo", "tis": {"enabled": True, "low": 0.5, "high": 1.5}}
    tb = backend(model, {}, algo)
    step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=3)
    set_rollout_logprobs(tb, step)
    batch = step.micro_batches[0]
    # the engine saw every trainable token as 1.0 nat less likely -> w = e = 2.718 -> 1.5
    batch.rollout_logprobs = batch.rollout_logprobs - batch.loss_mask
    metrics = tb.train(step)
    assert (
        metrics["mismatch_abs_diff"] == np.float32(1.0)
        or abs(metrics["mismatch_abs_diff"] - 1.0) < 1e-5
    )
    assert abs(metrics["tis_weight"] - 1.5) < 1e-6 and metrics["tis_clip_frac"] == 1.0
    assert abs(metrics["mismatch_k3"] - (np.e - 2.0)) < 1e-4


def test_bf16_autocast_step_tracks_fp32(toy_tokenizer):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = toy_model(len(toy_tokenizer), seed=8)
        tb = backend(model, {"dtype": dtype}, {"advantage": "grpo", "entropy_coef": 0.01})
        step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=8)
        logp = tb.logprobs(step.micro_batches)[0]
        assert logp.dtype == torch.float32
        metrics = tb.train(step)
        losses[dtype] = (metrics["entropy"], logp)
    entropy32, logp32 = losses["float32"]
    entropy16, logp16 = losses["bfloat16"]
    assert entropy16 == pytest.approx(entropy32, rel=2e-2)
    assert 0 < float((logp16 - logp32).abs().max()) < 0.1  # bf16 really ran, and stayed close


def test_unknown_model_name_lists_the_available_ones(toy_tokenizer):
    tb = backend(toy_model(len(toy_tokenizer)), {}, {"kl": {"coef": 0.0}})
    step = grpo_step(toy_tokenizer, n_prompts=1, n_samples=2, seed=9)
    with pytest.raises(ValueError, match=r"'ref' is not available; valid: \['actor'\]"):
        tb.logprobs(step.micro_batches, model="ref")
    with pytest.raises(ValueError, match="no critic"):
        tb.values(step.micro_batches)
