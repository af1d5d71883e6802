"""rollout.partial_rollout false in a whole RL job (embedded Ray, Redis and engine): at
max_staleness 2 the rollout runs ahead of the trainer, yet no training episode spans two
weight versions, and the per-staleness histogram covers every group the trainer took."""

from __future__ import annotations

import json
from pathlib import Path

from configs import load_job
from physarum.launch import execute

STEPS, PROMPTS = 3, 4
TINY = [
    "model.preset=glm4moe-tiny",
    "data.n_train=200",
    "data.n_eval=8",
    "rollout.n_samples_per_prompt=4",
    f"rollout.prompts_per_lease={PROMPTS}",
    "rollout.max_new_tokens=24",
    "rollout.eval.n_prompts=8",
    "rollout.eval.interval=0",
    f"trainer.prompts_per_step={PROMPTS}",
    f"trainer.steps={STEPS}",
    "checkpoint.interval=0",
    "checkpoint.save_hf=false",
    "logging.tensorboard=false",
    "logging.plot=false",
    "cluster.num_cpus=2",
    "rollout.request_timeout_s=120",
]


def test_non_partial_job_trains_single_version_episodes(tmp_path: Path) -> None:
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        *TINY,
        "buffer.max_staleness=2",
        "rollout.partial_rollout=false",
    ]
    execute(load_job(Path("configs/toy_grpo.yaml"), overrides))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "perf/step_s" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    last = steps[-1]
    assert last["rollout/multi_version_episodes"] == 0.0
    prefix = "buffer/staleness_hist/"
    hist = {int(k[len(prefix) :]): v for k, v in last.items() if k.startswith(prefix)}
    assert sum(hist.values()) == STEPS * PROMPTS  # every group taken, counted once
    assert max(hist) <= 2
