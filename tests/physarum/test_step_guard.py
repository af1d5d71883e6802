"""A job that trains on nothing stops (issue 18, item 4): the driver's per-step check."""

from __future__ import annotations

import asyncio

import pytest

from buffer.episode import EpisodeGroup
from physarum.step_guard import TrainingOnNothingError, check_step
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from tests.rewards.conftest import episode_with
from trainer.service import _group_metrics


def _metrics_of(labels: list[object]) -> dict[str, float]:
    """Score one episode per label with `arithmetic`, then take the trainer's step metrics."""
    episodes = [episode_with("The answer is 4", label=label) for label in labels]
    with build_reward_fn([RewardSpec("arithmetic")], timeout_s=10.0) as reward_fn:
        asyncio.run(reward_fn.score_group(episodes))
    return _group_metrics([EpisodeGroup(prompt_id="p", episodes=episodes)], train_version=0)


def test_list_valued_labels_stop_the_job() -> None:
    metrics = _metrics_of([[4, 5], [4], [1, 2], [3]])
    assert metrics["data/error_episodes"] == 4.0
    with pytest.raises(TrainingOnNothingError, match=r"step 3: 4 of 4 episodes \(100%\)"):
        check_step(3, metrics, max_error_fraction=0.5)


def test_a_minority_of_errors_trains_on() -> None:
    metrics = _metrics_of(["4", "4", "4", [4]])  # one error in four
    check_step(1, metrics, max_error_fraction=0.5)
    with pytest.raises(TrainingOnNothingError, match="reward.max_error_fraction = 0.2"):
        check_step(1, metrics, max_error_fraction=0.2)


def test_zero_episodes_stop_the_job() -> None:
    with pytest.raises(TrainingOnNothingError, match="step 2: trained on zero episodes"):
        check_step(2, {"data/episodes": 0.0, "data/error_episodes": 0.0}, 0.5)
