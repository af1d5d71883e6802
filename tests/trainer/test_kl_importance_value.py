"""KL estimators, truncated importance sampling, mismatch metrics, value loss, entropy bonus."""

from __future__ import annotations

import math

import torch

from trainer.losses.importance import icepop_is, mismatch_abs_diff, mismatch_k3, truncated_is
from trainer.losses.kl import kl_k1, kl_k2, kl_k3, kl_penalty
from trainer.losses.registry import lookup
from trainer.losses.value import clipped_value_loss, entropy_bonus

LOGP = torch.tensor([-1.0, -2.0])
REF = torch.tensor([-1.5, -1.0])


def test_kl_estimators_hand_computed():
    torch.testing.assert_close(kl_k1(LOGP, REF), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_k2(LOGP, REF), torch.tensor([0.125, 0.5]))
    # log r = ref - logp = [-0.5, 1]: e^-0.5 - 1 + 0.5 = 0.1065307; e - 1 - 1 = 0.7182818
    torch.testing.assert_close(kl_k3(LOGP, REF), torch.tensor([0.1065307, 0.7182818]))
    assert lookup("kl", "k3") is kl_k3


def test_k3_is_zero_at_equal_policies_and_its_gradient_matches_kl():
    logp = torch.tensor([-0.7, -3.0], requires_grad=True)
    kl = kl_k3(logp, logp.detach())
    assert torch.equal(kl.detach(), torch.zeros(2))
    kl.sum().backward()  # d/dlogp (e^(ref-logp) - 1 - ref + logp) = 1 - e^0 = 0
    torch.testing.assert_close(logp.grad, torch.zeros(2))


def test_kl_penalty_as_reward():
    got = kl_penalty(LOGP, REF, torch.tensor([1.0, 0.0]), coef=0.1, estimator=kl_k1)
    torch.testing.assert_close(got, torch.tensor([-0.05, 0.0]))


OLD = torch.zeros(4)
# exp(old - rollout) = [0.5, 3, e^0.1, 1]
ROLLOUT = torch.tensor([math.log(2.0), -math.log(3.0), -0.1, 0.0])


def test_truncated_importance_weights():
    out = truncated_is(OLD, ROLLOUT, low=0.6, high=2.0)
    torch.testing.assert_close(out.weights, torch.tensor([0.6, 2.0, math.exp(0.1), 1.0]))
    torch.testing.assert_close(out.clipped, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.raw, torch.tensor([0.5, 3.0, math.exp(0.1), 1.0]))


def test_icepop_zeroes_outside_the_range():
    out = icepop_is(OLD, ROLLOUT, low=0.6, high=2.0)
    torch.testing.assert_close(out.weights, torch.tensor([0.0, 0.0, math.exp(0.1), 1.0]))
    torch.testing.assert_close(out.clipped, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_mismatch_metrics():
    torch.testing.assert_close(
        mismatch_abs_diff(OLD, ROLLOUT), torch.tensor([math.log(2), math.log(3), 0.1, 0.0])
    )
    # d = old - rollout = [-ln 2, ln 3, 0.1, 0]: e^d - 1 - d
    expected = torch.tensor([0.5 - 1 + math.log(2), 3 - 1 - math.log(3), math.exp(0.1) - 1.1, 0])
    torch.testing.assert_close(mismatch_k3(OLD, ROLLOUT), expected.float())


def test_clipped_value_loss_hand_computed():
    # tok0: (1-2)^2 = 1 vs clipped v 0.7: (0.7-2)^2 = 1.69 -> 0.845 (clipped branch)
    # tok1: (0-0)^2 = 0 vs clipped v 0.3: 0.09 -> 0.045 (clipped branch)
    # tok2: v == old: 0.25 both -> 0.125
    values = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    out = clipped_value_loss(values, torch.full((3,), 0.5), torch.tensor([2.0, 0.0, 0.0]), 0.2)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([0.845, 0.045, 0.125]))
    torch.testing.assert_close(out.clipped, torch.tensor([1.0, 1.0, 0.0]))
    out.loss.sum().backward()  # the clipped branch has no gradient; tok2: v - R = 0.5
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.0, 0.5]))


def test_entropy_bonus():
    torch.testing.assert_close(
        entropy_bonus(torch.tensor([1.0, 2.0]), 0.01), torch.tensor([-0.01, -0.02])
    )
