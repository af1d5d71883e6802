"""algorithm.tis.max_token_lag: tokens too many versions behind the trainer leave the loss."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from configs import AlgorithmConfig
from trainer.backend import PackedBatch
from trainer.losses import ActorObjective, StepTotals
from trainer.losses.importance import version_lag_keep

# A partial rollout: prompt token, then a head generated at version 3 and a tail at version 5.
VERSIONS = torch.tensor([-1, 3, 3, 4, 5])


def test_keep_mask_hand_computed():
    keep = version_lag_keep(VERSIONS, policy_version=5, max_lag=1)
    torch.testing.assert_close(keep, torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    keep = version_lag_keep(VERSIONS, policy_version=5, max_lag=0)
    torch.testing.assert_close(keep, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))
    keep = version_lag_keep(VERSIONS, policy_version=5, max_lag=2)
    torch.testing.assert_close(keep, torch.ones(5))


def test_keep_mask_off():
    assert version_lag_keep(VERSIONS, policy_version=5, max_lag=None) is None
    assert version_lag_keep(VERSIONS, policy_version=None, max_lag=1) is None


def _batch(rollout_logprobs: torch.Tensor) -> PackedBatch:
    """One sequence: a prompt token, a response token of version 3 and one of version 5,
    built at trainer version 5."""
    return PackedBatch(
        input_ids=torch.tensor([5, 6, 7]),
        cu_seqlens=torch.tensor([0, 3]),
        loss_mask=torch.tensor([0.0, 1.0, 1.0]),
        rollout_logprobs=rollout_logprobs,
        advantages=torch.tensor([0.0, 1.0, 1.0]),
        versions=torch.tensor([-1, 3, 5]),
        seq_ids=torch.zeros(3, dtype=torch.long),
        old_logprobs=torch.zeros(3),
        policy_version=5,
    )


LOGP = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
TOTALS = StepTotals(agg=torch.tensor(2.0), tokens=torch.tensor(3.0))


@pytest.mark.parametrize("tis", [{"enabled": False}, {"enabled": True, "high": 2.0}])
def test_objective_drops_the_old_token_keeps_the_denominator(tis):
    algo = AlgorithmConfig(tis=tis | {"max_token_lag": 1})
    objective = ActorObjective.from_config(algo)
    logp = LOGP.clone().requires_grad_(True)
    # TIS weights (when on): token 1 min(exp(ln 4), 2) = 2, token 2 exp(0) = 1
    rollout = torch.tensor([0.0, -math.log(4.0), 0.0])
    loss, stats = objective(_batch(rollout), logp, TOTALS)
    m = stats.finalize()
    # token 1 (lag 2 > 1) dropped; token 2: ratio 0.5, A 1 -> -0.5, weight 1; over agg 2
    assert m["pg_loss"] == pytest.approx(-0.25)
    assert m["token_lag_masked_frac"] == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of token 2: -A * ratio / 2 = -0.25; the dropped token gets no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.25]))


def test_objective_unchanged_without_lag():
    objective = ActorObjective.from_config(AlgorithmConfig())
    _, stats = objective(_batch(torch.zeros(3)), LOGP, TOTALS)
    m = stats.finalize()
    # ppo: ratio 1.5 clipped -> -1.28; ratio 0.5 -> -0.5; mean over agg 2
    assert m["pg_loss"] == pytest.approx(-0.89)
    assert "token_lag_masked_frac" not in m


def test_config_rejects_a_negative_lag():
    assert AlgorithmConfig().tis.max_token_lag is None
    with pytest.raises(pydantic.ValidationError, match="max_token_lag"):
        AlgorithmConfig(tis={"max_token_lag": -1})
