"""PPO with a critic and a frozen reference, KL in the loss or the reward, MoE balancing,
the aux loss, and the LR schedule on the toy model."""

from __future__ import annotations

import pytest
import torch

from configs import TrainerConfig
from tests.trainer.toy import backend, grpo_step, set_rollout_logprobs, toy_model
from trainer.moe_balance import expert_load_metrics, update_expert_bias
from trainer.optim import build_optimizer, build_scheduler

PPO = {"advantage": "gae", "gamma": 1.0, "lam": 0.95, "kl": {"coef": 0.05, "estimator": "k3"}}


def test_ppo_with_critic_and_reference(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=4)
    tb = backend(model, {"lr": 1e-3, "critic_lr": 1e-3}, PPO | {"lam": 1.0})
    assert tb.critic is not None and tb.ref is not None
    step = grpo_step(toy_tokenizer, n_prompts=4, n_samples=4, seed=4)
    set_rollout_logprobs(tb, step)
    head = tb.critic.head.weight.detach().clone()
    first = tb.train(step)
    batch = step.micro_batches[0]
    # the fresh critic's head is zero: V = 0, so with gamma = lam = 1 returns = the reward
    rewards = step.rewards[batch.sample_index[batch.seq_ids]]
    torch.testing.assert_close(batch.values, torch.zeros_like(batch.values))
    torch.testing.assert_close(batch.returns, rewards * batch.loss_mask)
    assert first["kl"] == 0.0 and first["kl_loss"] == 0.0  # the reference is the initial actor
    assert first["value_loss"] > 0 and "critic/grad_norm" in first
    assert not torch.equal(tb.critic.head.weight, head)
    later = [tb.train(step) for _ in range(3)][-1]
    assert later["kl"] > 0.0 and later["kl_loss"] > 0.0
    assert later["value_loss"] < first["value_loss"]
    assert all(p.grad is None or not p.requires_grad for p in tb.ref.parameters())


def test_kl_in_reward_penalises_the_advantages(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=5)
    algo = {"advantage": "reinforce_pp", "kl": {"coef": 0.1, "estimator": "k1", "mode": "reward"}}
    tb = backend(model, {"lr": 1e-2}, algo)
    step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=5)
    tb.train(step)
    tb.train(step)  # the actor has moved away from the reference
    batches = tb.prepare(step)
    old, ref = batches[0].old_logprobs, batches[0].ref_logprobs
    assert old is not None and ref is not None and not torch.equal(old, ref)
    # the same step without the penalty gives different advantages
    penalised = batches[0].advantages.clone()
    tb.algo = tb.algo.model_copy(update={"kl": tb.algo.kl.model_copy(update={"coef": 0.0})})
    tb.prepare(step)
    assert not torch.allclose(penalised, step.micro_batches[0].advantages)


def test_loss_free_balancing_hand_computed():
    model = toy_model(64, seed=0, preset="glm4moe-tiny")
    blocks = model.moe_blocks()
    load = torch.zeros(len(blocks), 4)
    load[0] = torch.tensor([10.0, 2.0, 4.0, 0.0])  # mean 4: -u, +u, 0, +u
    delta = update_expert_bias(blocks, load, rate=0.01)
    torch.testing.assert_close(blocks[0].gate.e_score_correction_bias,
                               torch.tensor([-0.01, 0.01, 0.0, 0.01]))  # fmt: skip
    torch.testing.assert_close(delta[1:], torch.zeros(len(blocks) - 1, 4))  # balanced: no move
    metrics = expert_load_metrics(load)
    assert metrics["moe/layer0_max_load"] == 10.0 and metrics["moe/layer0_mean_load"] == 4.0
    with pytest.raises(ValueError, match="one per MoE layer"):
        update_expert_bias(blocks, load[:1], rate=0.01)


def test_train_step_balances_from_the_steps_expert_load(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=6)
    tb = backend(model, {}, {"moe": {"bias_update_rate": 0.5, "aux_loss_coef": 0.01}})
    step = grpo_step(toy_tokenizer, n_prompts=4, n_samples=4, seed=6)
    batch = step.micro_batches[0]
    with torch.no_grad():
        load = model.forward_packed(batch.input_ids, batch.cu_seqlens).expert_load
    metrics = tb.train(step)
    expected = 0.5 * torch.sign(load.mean(dim=1, keepdim=True) - load)
    got = torch.stack([b.gate.e_score_correction_bias for b in model.moe_blocks()])
    torch.testing.assert_close(got, expected)
    assert metrics["moe/layer0_max_load"] == float(load[0].max())
    assert metrics["aux_loss"] > 0
    assert metrics["loss"] == pytest.approx(metrics["pg_loss"] + metrics["aux_loss"], rel=1e-5)


def test_lr_warmup_then_cosine_decay():
    cfg = TrainerConfig(lr=1.0, min_lr=0.1, warmup_steps=3, lr_schedule="cosine", steps=7)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, cfg.lr)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warmup 1/4, 2/4, 3/4; then 0.1 + 0.9 * (1 + cos(pi * k / 4)) / 2 for k = 0..4
    expected = [0.25, 0.5, 0.75, 1.0, 0.1 + 0.9 * 0.8535534, 0.55, 0.1 + 0.9 * 0.1464466, 0.1]
    assert lrs == pytest.approx(expected, abs=1e-6)
