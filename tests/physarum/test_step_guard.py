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


@pytest.mark.slow
def test_job_on_list_valued_labels_exits_non_zero(tmp_path, capsys) -> None:
    """The whole job (embedded Ray and Redis, tiny model): every episode is an error, so the
    first step stops it with the message and exit status 2, not 0 after training on nothing."""
    from envs.tasks import make_rows, write_jsonl
    from physarum.cli import main

    rows = [{**row, "label": [row["label"]]} for row in make_rows("arithmetic", 16, seed=0)]
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"data.train_path={train}",
        "data.n_eval=4",
        "model.preset=glm4moe-tiny",
        "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=8",
        "rollout.eval.n_prompts=4",
        "rollout.eval.k=1",
        "trainer.prompts_per_step=2",
        "trainer.steps=2",
        "cluster.num_cpus=2",
        "logging.dashboard=false",
    ]
    argv = ["run", "configs/toy_grpo.yaml"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 2  # the CLI's exit status for a user-facing error
    err = capsys.readouterr().err
    assert "step 1:" in err and "are errors, above reward.max_error_fraction = 0.5" in err


def test_rejection_sampling_rounds_are_named_as_rounds() -> None:
    metrics = _metrics_of([[1], [2]])
    with pytest.raises(TrainingOnNothingError, match="rejection sampling round 2: 2 of 2"):
        check_step(2, metrics, 0.5, unit="rejection sampling round")
