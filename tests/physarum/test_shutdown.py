"""An RL job whose buffer is full when training ends still stops in seconds.

With capacity 1 and producers allowed four versions ahead, the rollout worker is blocked
on a full buffer whenever the trainer is not taking; at the end the trainer never takes
again, and before the fix the driver waited for `put_timeout_s` (600 s) or forever.
"""

from __future__ import annotations

import json
from pathlib import Path

from configs import load_job
from physarum.launch import execute

FULL_BUFFER = [
    "model.preset=glm4moe-tiny",
    "data.n_train=64",
    "data.n_eval=4",
    "rollout.n_samples_per_prompt=2",
    "rollout.prompts_per_lease=4",
    "rollout.max_running=16",
    "rollout.eval.n_prompts=4",
    "rollout.eval.k=1",
    "rollout.eval.temperature=0.0",
    "buffer.capacity=1",
    "buffer.max_staleness=4",
    "trainer.prompts_per_step=1",
    "trainer.steps=3",
    "cluster.num_cpus=2",
    "rollout.request_timeout_s=120",
]


def test_rl_job_with_a_full_buffer_stops_in_seconds(tmp_path: Path) -> None:
    job = load_job(Path("configs/toy_grpo.yaml"), [f"run_dir={tmp_path}", *FULL_BUFFER])
    result = execute(job)
    assert result["steps"] == 3
    assert result["rollout/stop_seconds"] < 30, result["rollout/stop_seconds"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    # Sampled after the final checkpoint, not right after the last take (which races the
    # producer's refill): the worker has had the checkpoint's time to fill the one slot.
    assert final["buffer/groups_unconsumed_at_stop"] >= 1  # the buffer was full at the end
    assert final["rollout/groups_dropped"] == result["rollout/groups_dropped"]
