"""configs/toy_openai_agent.yaml, small enough for CI: the RL job runs an agent written with
the `openai` client for 3 steps on an embedded Ray and Redis. Every episode comes from the
agent's calls to the rollout worker's own endpoint (agent/* metrics), none is an error, and
the held-out eval scores the agent's runs. (The learning run is documented in the README.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from configs import load_job
from physarum.launch import execute

TINY = [
    "model.preset=glm4moe-tiny",
    "data.n_train=32",
    "data.n_eval=4",
    "rollout.n_samples_per_prompt=2",
    "rollout.prompts_per_lease=2",
    "rollout.max_new_tokens=8",
    "rollout.eval.n_prompts=4",
    "rollout.eval.k=1",
    "rollout.eval.interval=3",
    "trainer.prompts_per_step=2",
    "trainer.steps=3",
    "checkpoint.interval=3",
    "cluster.num_cpus=2",
    "env.agent_timeout_s=60",
]


def test_openai_agent_job_trains_on_the_agents_calls(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    job = load_job(Path("configs/toy_openai_agent.yaml"), [f"run_dir={tmp_path}", *TINY])
    result = execute(job)
    assert result["steps"] == 3
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert sorted(r["step"] for r in steps) == [1, 2, 3]
    for record in steps:
        assert record["data/episodes"] >= 4  # 2 prompts x 2 runs (a split run adds episodes)
        assert record["data/error_episodes"] == 0
        assert record["agent/runs"] >= 4 and record["agent/calls"] >= record["agent/runs"]
        assert record["agent/errors"] == 0
    evals = [r for r in records if "eval/accuracy" in r or "eval/pass@1" in r]
    assert {r["step"] for r in evals} == {0, 3}
    assert all("eval/tool_call_rate" in r for r in evals)  # from the agent's recorded calls
