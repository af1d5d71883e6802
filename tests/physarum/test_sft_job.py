"""An SFT job that stops early at `rollout.eval.stop_at_accuracy`, and the config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import ConfigError, load_job
from physarum.launch import execute

TINY_SFT = [
    "model.preset=glm4moe-tiny",
    "data.n_train=200",
    "data.n_eval=8",
    "trainer.batch_size=8",
    "trainer.steps=40",
    "rollout.eval.n_prompts=8",
    "rollout.eval.interval=5",
    "checkpoint.interval=0",
    "cluster.num_cpus=2",
]


def test_sft_stops_at_the_first_eval_reaching_the_target(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # every sample counts as correct (reward >= 0), so the first eval after step 0 reaches it
    overrides = [
        f"run_dir={run_dir}",
        *TINY_SFT,
        "rollout.eval.correct_min_reward=0.0",
        "rollout.eval.stop_at_accuracy=0.5",
    ]
    result = execute(load_job(Path("configs/toy_sft.yaml"), overrides))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = sorted({r["step"] for r in records if "train/loss" in r})
    assert trained == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 5]
    assert result["steps"] == 5
    assert (run_dir / "checkpoints" / "step_5" / "COMPLETE").read_text() == "5"
    assert (run_dir / "hf" / "config.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=rl", "rollout.eval.stop_at_accuracy=0.5"], "early stopping is for mode sft"),
        (["rollout.eval.interval=0", "rollout.eval.stop_at_accuracy=0.5"], "interval > 0"),
        (["rollout.eval.stop_at_accuracy=1.5"], "rollout.eval.stop_at_accuracy"),
    ],
)
def test_stop_at_accuracy_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(Path("configs/toy_sft.yaml"), overrides)
    assert message in str(info.value)
