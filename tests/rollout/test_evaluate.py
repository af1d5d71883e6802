"""pass@k against hand-computed values, and evaluate_rows over scripted samples."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from buffer.episode import Episode
from rollout.evaluate import evaluate_rows, pass_at_k


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 3, 2) == 1.0


def _episode(reward: float) -> Episode:
    e = Episode.from_generation([1, 2], [3, 4], [-0.1, -0.2], [0, 0], "stop")
    e.reward = reward
    return e


def test_evaluate_rows_counts_correct_samples() -> None:
    scripted = {"a": [1.0, 0.0], "b": [0.0, 0.0], "c": [1.0, 1.0]}

    async def generate(row):
        return [_episode(0.0) for _ in scripted[row["id"]]]

    async def score(episodes):
        # the reward comes from the scripted table, keyed by the episode's position
        key = episodes[0].metadata["id"] if episodes[0].metadata else None
        assert key is None
        for e, r in zip(episodes, next(iter_rewards), strict=True):
            e.reward = r

    iter_rewards = iter(scripted.values())
    rows = [{"id": key} for key in scripted]
    outcome = asyncio.run(evaluate_rows(rows, generate, score, k=2, concurrency=1))
    result = outcome.metrics
    assert [s["id"] for s in outcome.samples] == ["a", "a", "b", "b", "c", "c"]
    assert [s["reward"] for s in outcome.samples] == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert result["eval/accuracy"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert result["eval/pass@2"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert result["eval/reward_mean"] == pytest.approx(np.mean([1, 0, 0, 0, 1, 1]))
