"""reasoning-gym tasks by name (`data.task: reasoning_gym:<dataset>`) and their reward.

Real reasoning-gym generators and scorers (the `envs` extra), no stand-ins.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import reasoning_gym

from configs import load_job
from envs.tasks import get_task, make_rows, split_of
from physarum.errors import UserError
from physarum.prepare import prepare
from physarum.rundir import RunDir
from rewards.registry import RewardSpec, resolve_reward
from rewards.resolver import PluginError
from tests.rewards.conftest import episode_with

TASK = "reasoning_gym:leg_counting"


def test_rows_come_from_reasoning_gym_and_respect_the_split() -> None:
    train = make_rows(TASK, 30, seed=0, split="train", min_animals=1, max_animals=2)
    test = make_rows(TASK, 10, seed=0, split="test", min_animals=1, max_animals=2)
    assert train == make_rows(
        TASK, 30, seed=0, split="train", min_animals=1, max_animals=2
    )  # reproducible
    assert {r["task"] for r in train + test} == {TASK}
    assert {split_of(TASK, r["messages"][-1]["content"]) for r in test} == {"test"}
    assert not {r["messages"][-1]["content"] for r in train} & {
        r["messages"][-1]["content"] for r in test
    }
    scorer = reasoning_gym.get_score_answer_fn("leg_counting")
    for row in train:
        info = row["metadata"]["reasoning_gym"]
        assert info["dataset"] == "leg_counting"
        assert len(info["metadata"]["animals"]) <= 2  # task_args reached the generator
        legs = info["metadata"]["total_legs"]
        assert row["label"] == str(legs)
        assert scorer(row["label"], {"answer": row["label"], "metadata": info["metadata"]}) == 1.0


def test_system_prompt_by_reasoning_gym_name() -> None:
    row = make_rows(TASK, 1, system_prompt="direct")[0]
    assert row["messages"][0]["role"] == "system"
    assert "<answer>" in row["messages"][0]["content"]


def test_bad_names_and_args_say_what_is_valid() -> None:
    with pytest.raises(PluginError, match=r"unknown reasoning-gym dataset 'leg_countin'.*"):
        get_task("reasoning_gym:leg_countin")
    with pytest.raises(PluginError, match=r"Families: reasoning_gym:<name>"):
        get_task("reasoning-gym")
    with pytest.raises(ValueError, match=r"data.task_args.*'bogus'.*max_animals"):
        make_rows(TASK, 2, bogus=1)


def test_a_bad_dataset_in_a_job_names_data_task(tmp_path: Path) -> None:
    job = load_job(
        Path("configs/toy_reasoning_gym.yaml"),
        [f"run_dir={tmp_path}", "data.task=reasoning_gym:no_such_dataset"],
    )
    with pytest.raises(UserError, match=r"^data.task: unknown reasoning-gym dataset"):
        prepare(job, RunDir(tmp_path))


def test_reward_uses_the_datasets_own_scorer() -> None:
    reward = resolve_reward(RewardSpec("reasoning_gym")).fn
    row = make_rows(TASK, 1, seed=3)[0]
    meta = {"label": row["label"], **row["metadata"]}
    assert reward(episode_with(f"thinking...<answer> {row['label']} </answer>", **meta)) == 1.0
    assert reward(episode_with(row["label"], **meta)) == 1.0  # a bare direct answer
    assert reward(episode_with("<answer>-1</answer>", **meta)) == 0.0
    # reasoning-gym's default partial credit: the answer inside a longer text
    partial = reward(episode_with(f"{row['label']} legs", **meta))
    assert 0.0 < partial < 1.0


def test_reward_without_a_reasoning_gym_row_says_why() -> None:
    reward = resolve_reward(RewardSpec("reasoning_gym")).fn
    with pytest.raises(ValueError, match=r"metadata\['reasoning_gym'\] is missing"):
        reward(episode_with("4", label="4"))
