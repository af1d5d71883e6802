"""The composed actor/critic objective on a hand-made packed batch, and metric accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from configs import AlgorithmConfig
from trainer.backend import PackedBatch
from trainer.losses import ActorObjective, CriticObjective, StatSums, StepTotals


def _batch(**kw) -> PackedBatch:
    """One sequence: a prompt token then two response tokens."""
    base = dict(
        input_ids=torch.tensor([5, 6, 7]),
        cu_seqlens=torch.tensor([0, 3]),
        loss_mask=torch.tensor([0.0, 1.0, 1.0]),
        rollout_logprobs=torch.zeros(3),
        advantages=torch.tensor([0.0, 1.0, 1.0]),
        versions=torch.tensor([-1, 0, 0]),
        seq_ids=torch.zeros(3, dtype=torch.long),
        old_logprobs=torch.zeros(3),
        ref_logprobs=torch.zeros(3),
    )
    return PackedBatch(**(base | kw))


LOGP = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
TOTALS = StepTotals(agg=torch.tensor(2.0), tokens=torch.tensor(3.0))


def test_actor_loss_parts_hand_computed():
    algo = AlgorithmConfig(entropy_coef=0.01, kl={"coef": 0.1, "estimator": "k1"})
    objective = ActorObjective.from_config(algo)
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = objective(_batch(), logp, TOTALS, entropy=torch.tensor([0.0, 1.0, 3.0]))
    m = stats.finalize()
    # ppo: ratio 1.5, A 1 -> -1.28 (clipped); ratio 0.5, A 1 -> -0.5; token mean -0.89
    assert m["pg_loss"] == pytest.approx(-0.89)
    # k1 = logp - ref = [ln 1.5, ln 0.5] -> mean -0.1438410, times 0.1
    assert m["kl_loss"] == pytest.approx(0.1 * (math.log(1.5) + math.log(0.5)) / 2)
    assert m["entropy_loss"] == pytest.approx(-0.01 * 2.0) and m["entropy"] == 2.0
    assert float(loss.detach()) == pytest.approx(m["pg_loss"] + m["kl_loss"] + m["entropy_loss"])
    assert m["clip_frac"] == 0.5 and m["ratio"] == pytest.approx(1.0)
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(0.5)
    assert m["ppo_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 2)
    loss.backward()
    # d/dlogp: token 1 clipped -> only kl (0.1/2) ; token 2: -A*ratio/2 + 0.1/2 = -0.25 + 0.05
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.05, -0.2]))


def test_truncated_importance_sampling_weights_the_policy_loss():
    algo = AlgorithmConfig(tis={"enabled": True, "low": 0.0, "high": 2.0})
    objective = ActorObjective.from_config(algo)
    rollout = torch.tensor([0.0, -math.log(4.0), 0.0])  # w = [., min(4, 2), 1]
    _, stats = objective(_batch(rollout_logprobs=rollout), LOGP, TOTALS)
    m = stats.finalize()
    assert m["pg_loss"] == pytest.approx((2 * -1.28 - 0.5) / 2)
    assert m["tis_weight"] == pytest.approx(1.5) and m["tis_clip_frac"] == 0.5
    assert m["tis_weight_max"] == pytest.approx(2.0) and m["tis_weight_min"] == pytest.approx(1.0)
    assert m["mismatch_abs_diff"] == pytest.approx(math.log(4.0) / 2)


def test_sft_override_and_critic_objective():
    sft = ActorObjective.from_config(AlgorithmConfig(), policy_loss="sft")
    loss, stats = sft(_batch(), LOGP, TOTALS)
    assert float(loss) == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 2)
    assert "ratio" not in stats.finalize()  # no policy-ratio metrics for SFT
    critic = CriticObjective.from_config(AlgorithmConfig(vf_coef=0.5, value_clip=10.0))
    batch = _batch(returns=torch.tensor([0.0, 1.0, 2.0]), values=torch.zeros(3))
    loss, stats = critic(batch, torch.tensor([0.0, 0.0, 1.0]), TOTALS)
    # 0.5 * token_mean(0.5 * [(0-1)^2, (1-2)^2]) = 0.25
    assert float(loss) == pytest.approx(0.25) and stats.finalize()["value_loss"] == 0.25


def test_stat_sums_merge_means_sums_and_extremes():
    a, b = StatSums(), StatSums()
    a.add_masked_mean("x", torch.tensor([1.0, 5.0]), torch.tensor([1.0, 0.0]))
    b.add_masked_mean("x", torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.0]))
    a.add_sum("loss", 0.25)
    b.add_sum("loss", 0.5)
    a.add_masked_extremes("r", torch.tensor([2.0, 9.0]), torch.tensor([1.0, 0.0]))
    b.add_masked_extremes("r", torch.tensor([0.5]), torch.tensor([0.0]))  # nothing trainable
    a.merge(b)
    m = a.finalize()
    assert m["x"] == 3.0 and m["loss"] == 0.75 and m["r_max"] == 2.0 and m["r_min"] == 2.0
    empty = StatSums()
    empty.include(a.names())
    assert empty.finalize() == {"x": 0.0, "loss": 0.0, "r_max": 0.0, "r_min": 0.0}
