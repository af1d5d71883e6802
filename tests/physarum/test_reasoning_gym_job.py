"""A short GRPO job on a reasoning-gym task named in the config (embedded Ray, Redis, engine).

A random tiny model will not learn leg counting in two steps; the point is that the task
resolves by name, its rows reach the rollout, and every episode is scored by
reasoning-gym's own scorer: each eval reward equals that scorer on the eval response.
"""

from __future__ import annotations

import json
from pathlib import Path

import reasoning_gym

from configs import load_job
from envs.tasks import read_jsonl
from physarum.launch import execute
from rewards.builtins.reasoning_gym import extract_answer

TINY = [
    "model.preset=glm4moe-tiny",
    "data.n_train=64",
    "data.n_eval=8",
    "rollout.n_samples_per_prompt=4",
    "rollout.prompts_per_lease=4",
    "rollout.max_running=32",
    "rollout.eval.n_prompts=8",
    "rollout.eval.interval=0",
    "trainer.prompts_per_step=4",
    "trainer.steps=2",
    "checkpoint.interval=0",
    "cluster.num_cpus=2",
    "rollout.request_timeout_s=120",
]


def test_reasoning_gym_task_runs_by_name(tmp_path: Path) -> None:
    job = load_job(Path("configs/toy_reasoning_gym.yaml"), [f"run_dir={tmp_path}", *TINY])
    result = execute(job)
    assert result["steps"] == 2

    rows = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert {r["task"] for r in rows} == {"reasoning_gym:leg_counting"}
    assert all(r["metadata"]["reasoning_gym"]["dataset"] == "leg_counting" for r in rows)

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["data/episodes"] == 16 and record["data/error_episodes"] == 0
        assert 0.0 <= record["reward"] <= 1.0

    evals = sorted((tmp_path / "eval").glob("step_*.jsonl"))
    assert evals, "the job wrote no eval samples"
    by_id = {r["id"]: r for r in read_jsonl(tmp_path / "data" / "eval.jsonl")}
    scorer = reasoning_gym.get_score_answer_fn("leg_counting")
    samples = [json.loads(x) for x in evals[-1].read_text().splitlines()]
    assert len(samples) == 8
    for sample in samples:
        row = by_id[sample["id"]]
        entry = {"answer": row["label"], "metadata": row["metadata"]["reasoning_gym"]["metadata"]}
        assert sample["reward"] == scorer(extract_answer(sample["response"]), entry)
