"""Rollout-trainer mismatch split by finish reason and staleness, on hand-computed tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from buffer.episode import Episode
from configs import AlgorithmConfig
from trainer.batch import build_step
from trainer.losses.objective import ActorObjective, StepTotals

# per episode: finish reason, token versions, d = trainer (old) - rollout logprob per token
EPISODES = [
    ("stop", [5, 5], [0.1, -0.2]),
    ("length", [4, 5], [1.0, 0.0]),
    ("stop", [3, 3], [-1.0, 0.5]),
]
VERSION = 5  # the trainer's version when the step is built


def _batch():
    episodes = []
    for finish, versions, _ in EPISODES:
        episodes.append(
            Episode(
                prompt_ids=[1, 2],
                response_ids=[3, 4],
                loss_mask=np.ones(2),
                rollout_logprobs=np.array([-1.0, -2.0]),
                versions=np.array(versions),
                reward=0.0,
                finish_reason=finish,
            )
        )
    step = build_step(episodes, [0, 1, 2], micro_batch_tokens=64, current_version=VERSION)
    (batch,) = step.micro_batches
    d = torch.zeros(batch.num_tokens)
    for seq, (_, _, diffs) in enumerate(EPISODES):
        d[(batch.seq_ids == seq) & (batch.loss_mask > 0)] = torch.tensor(diffs)
    batch.old_logprobs = batch.rollout_logprobs + d
    return batch


def _k3(d: float) -> float:
    return math.exp(d) - 1 - d


def _metrics(tis: bool) -> dict[str, float]:
    batch = _batch()
    algo = AlgorithmConfig(tis={"enabled": tis, "low": 0.5, "high": 2.0})
    objective = ActorObjective.from_config(algo)
    totals = StepTotals(agg=torch.tensor(6.0), tokens=torch.tensor(12.0))
    _, stats = objective(batch, batch.old_logprobs.clone(), totals)
    return stats.finalize()


def test_mismatch_is_split_by_finish_reason_and_staleness() -> None:
    m = _metrics(tis=True)
    approx = pytest.approx
    # by finish reason: stop = episodes 0 and 2, length = episode 1
    assert m["mismatch_abs_diff/finish_stop"] == approx((0.1 + 0.2 + 1.0 + 0.5) / 4)
    assert m["mismatch_abs_diff/finish_length"] == approx(0.5)
    assert m["mismatch_k3/finish_length"] == approx((_k3(1.0) + _k3(0.0)) / 2)
    assert m["mismatch_k3/finish_stop"] == approx(sum(map(_k3, [0.1, -0.2, -1.0, 0.5])) / 4)
    # by staleness 5 - version: 0 = episode 0 and episode 1's 2nd token, 1 = episode 1's 1st
    assert m["mismatch_abs_diff/stale_0"] == approx((0.1 + 0.2 + 0.0) / 3)
    assert m["mismatch_abs_diff/stale_1"] == approx(1.0)
    assert m["mismatch_abs_diff/stale_2"] == approx(0.75)
    assert m["mismatch_k3/stale_2"] == approx((_k3(-1.0) + _k3(0.5)) / 2)
    # TIS truncation (weights exp(d) outside [0.5, 2]): exp(1) and exp(-1) only
    assert m["tis_clip_frac"] == approx(2 / 6)
    assert m["tis_clip_frac/finish_stop"] == approx(1 / 4)
    assert m["tis_clip_frac/finish_length"] == approx(1 / 2)
    assert m["tis_clip_frac/stale_0"] == 0.0
    assert m["tis_clip_frac/stale_1"] == 1.0 and m["tis_clip_frac/stale_2"] == 0.5
    # the unsplit means are unchanged
    assert m["mismatch_abs_diff"] == approx((0.1 + 0.2 + 1.0 + 0.0 + 1.0 + 0.5) / 6)
    assert not any(k.endswith(("finish_abort", "stale_3")) for k in m)


def test_without_tis_there_is_no_truncation_fraction() -> None:
    m = _metrics(tis=False)
    assert "mismatch_k3/stale_1" in m and not any(k.startswith("tis_clip_frac") for k in m)
