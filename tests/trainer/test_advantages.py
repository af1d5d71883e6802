"""Advantage estimators against hand-computed tensors (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.advantages import (
    AdvantageInputs,
    AdvantageParams,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    rloo_advantages,
    token_rewards,
)
from trainer.losses.registry import lookup

# group 0: [1, 0, 1, 0]  mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5773503
# group 1: [0, 3, 6]     mean 3,   unbiased std sqrt((9 + 0 + 9) / 2) = 3
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 3.0, 6.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1])


def test_grpo_group_mean_and_unbiased_std():
    got = grpo_advantages(SCORES, GROUPS, eps=1e-6)
    a = 0.5 / (0.5773503 + 1e-6)  # 0.8660239
    b = 3.0 / (3.0 + 1e-6)
    expected = torch.tensor([a, -a, a, -a, -b, 0.0, b])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_grpo_constant_group_gives_zero_and_singleton_gives_zero():
    scores = torch.tensor([2.0, 2.0, 5.0])
    got = grpo_advantages(scores, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(got, torch.zeros(3))


def test_dr_grpo_subtracts_mean_only():
    got = dr_grpo_advantages(SCORES, GROUPS)
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5, -3.0, 0.0, 3.0])
    torch.testing.assert_close(got, expected)


def test_rloo_leave_one_out_baseline():
    # 1 - mean(0, 1, 0) = 2/3; 0 - mean(1, 1, 0) = -2/3; 0 - mean(3, 6) = -4.5; 6 - 1.5 = 4.5
    got = rloo_advantages(SCORES, GROUPS)
    expected = torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3, -4.5, 0.0, 4.5])
    torch.testing.assert_close(got, expected)
    assert float(rloo_advantages(torch.tensor([7.0]), torch.tensor([0]))[0]) == 0.0


def test_group_estimators_broadcast_to_trainable_tokens_and_add_penalties():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    # scores: 1 + (-0.5) = 0.5 and 0 + 0 = 0 (the penalty on a masked token does not count)
    penalties = torch.tensor([[-0.25, -0.25, 0.0], [0.0, -9.0, 0.0]])
    inp = AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
        mask=mask,
        penalties=penalties,
    )
    out = lookup("advantage", "dr_grpo")(inp, AdvantageParams())
    expected = torch.tensor([[0.25, 0.25, 0.0], [-0.25, 0.0, -0.25]])
    torch.testing.assert_close(out.advantages, expected)
    assert out.returns is None


def test_token_rewards_put_the_reward_on_the_last_trainable_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    inp = AdvantageInputs(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0, 1, 2]), mask)
    expected = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_rewards(inp), expected)


def test_discounted_returns_skip_masked_tokens():
    # mask [1, 0, 1], reward 1 at the end, gamma 0.5: G2 = 1, G1 skipped, G0 = 0.5 * 1
    rewards = torch.tensor([[0.0, 7.0, 1.0]])
    got = discounted_returns(rewards, torch.tensor([[1.0, 0.0, 1.0]]), gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.0, 1.0]]))


def test_reinforce_pp_global_whitening():
    # token rewards: seq0 [-0.1, -0.1, 0.9]; seq1 [0, -0.2, (pad)]; gamma 0.5
    # returns: seq0 G2 = 0.9, G1 = -0.1 + 0.45 = 0.35, G0 = -0.1 + 0.175 = 0.075
    #          seq1 G1 = -0.2, G0 = -0.1
    # mean = 1.025 / 5 = 0.205; deviations -0.13, 0.145, 0.695, -0.305, -0.405
    # unbiased var = 0.778 / 4 = 0.1945, std = 0.4410215
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    penalties = torch.tensor([[-0.1, -0.1, -0.1], [0.0, -0.2, 0.0]])
    inp = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), mask, penalties)
    out = lookup("advantage", "reinforce_pp")(inp, AdvantageParams(gamma=0.5, eps=0.0))
    std = 0.4410215
    expected = torch.tensor(
        [[-0.13 / std, 0.145 / std, 0.695 / std], [-0.305 / std, -0.405 / std, 0.0]]
    )
    torch.testing.assert_close(out.advantages, expected, atol=1e-5, rtol=0)


def test_masked_whiten_ignores_masked_positions():
    x = torch.tensor([1.0, 100.0, 3.0])
    got = masked_whiten(x, torch.tensor([1.0, 0.0, 1.0]), eps=0.0)
    # mean 2, unbiased std sqrt(2) -> -1/sqrt(2), 0, 1/sqrt(2)
    torch.testing.assert_close(got, torch.tensor([-(0.5**0.5), 0.0, 0.5**0.5]))


def test_gae_hand_computed():
    # rewards [0, 0, 1], V [0.5, 0.6, 0.7], gamma 1, lam 0.5
    # t2: delta = 1 - 0.7 = 0.3; A2 = 0.3
    # t1: delta = 0.7 - 0.6 = 0.1; A1 = 0.1 + 0.5 * 0.3 = 0.25
    # t0: delta = 0.6 - 0.5 = 0.1; A0 = 0.1 + 0.5 * 0.25 = 0.225; returns = A + V
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    out = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.725, 0.85, 1.0]]))


def test_gae_with_lam_one_is_discounted_return_minus_value():
    # gamma 0.9: G = [0.81, 0.9, 1.0]; A = G - V = [0.31, 0.3, 0.3]
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    out = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.31, 0.3, 0.3]]))


def test_gae_skips_tool_tokens():
    # mask [1, 0, 1]: the value 9.0 of the tool token is never used.
    # t2: A = 0.3; t0: delta = 0.7 - 0.5 = 0.2, A0 = 0.2 + 0.5 * 0.3 = 0.35
    inp = AdvantageInputs(
        rewards=torch.tensor([1.0]),
        group_ids=torch.tensor([0]),
        mask=torch.tensor([[1.0, 0.0, 1.0]]),
        values=torch.tensor([[0.5, 9.0, 0.7]]),
    )
    out = lookup("advantage", "gae")(inp, AdvantageParams(gamma=1.0, lam=0.5))
    torch.testing.assert_close(out.advantages, torch.tensor([[0.35, 0.0, 0.3]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.85, 0.0, 1.0]]))


def test_gae_without_values_names_the_field():
    inp = AdvantageInputs(torch.tensor([1.0]), torch.tensor([0]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="values"):
        lookup("advantage", "gae")(inp, AdvantageParams())
