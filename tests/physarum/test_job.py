"""A whole RL job on an embedded Ray and an embedded Redis, small enough for CI.

It checks what a user relies on: the artifacts of a run, that every consumed group was
acknowledged after the final checkpoint, that staleness stayed within the bound, and that
the weights the rollout evaluated are the weights the trainer saved.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis

from configs import load_job
from envs.tasks import read_jsonl
from physarum.launch import execute

TINY = [
    "model.preset=glm4moe-tiny",
    "data.n_train=200",
    "data.n_eval=16",
    "rollout.n_samples_per_prompt=4",
    "rollout.prompts_per_lease=4",
    "rollout.max_running=32",
    "rollout.eval.n_prompts=16",
    "rollout.eval.k=1",  # greedy evals: tests compare them with a re-run outside the job
    "rollout.eval.temperature=0.0",
    "rollout.eval.interval=2",
    "trainer.prompts_per_step=4",
    "trainer.steps=3",
    "trainer.lr=1e-3",
    "checkpoint.interval=2",
    "cluster.num_cpus=2",
    "rollout.request_timeout_s=120",
]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("rl_job")
    # A random tiny model earns no reward, so GRPO's advantages are all zero; the loss-free
    # balancing update (frozen in the preset) is what moves its weights in three steps.
    overrides = [f"run_dir={run_dir}", *TINY, "algorithm.moe.bias_update_rate=1e-3"]
    return run_dir, execute(load_job(Path("configs/toy_grpo.yaml"), overrides))


def test_rl_job_writes_every_artifact(rl_run: tuple[Path, dict]) -> None:
    run_dir, result = rl_run
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = sorted({r["step"] for r in records if "reward" in r})
    assert train_steps == [1, 2, 3]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 2, 3]
    for record in records:
        if "reward" in record:
            assert 0.0 <= record["reward"] <= 1.0
            assert record["buffer/staleness_max"] <= 1  # max_staleness of toy_grpo
            assert record["data/episodes"] == 16  # 4 prompts x 4 samples
    for step in (2, 3):
        assert (run_dir / "checkpoints" / f"step_{step}" / "COMPLETE").exists()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (run_dir / "hf" / name).exists(), name
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert any((run_dir / "tb").rglob("events.out.tfevents*"))
    assert result["steps"] == 3 and "eval/accuracy" in result


def test_rl_job_acknowledged_everything_it_trained_on(rl_run: tuple[Path, dict]) -> None:
    run_dir, _ = rl_run
    aof = list((run_dir / "redis").rglob("*.aof")) + list((run_dir / "redis").rglob("*.rdb"))
    assert aof, "the embedded redis-server persisted nothing"
    from buffer.redis_server import EmbeddedRedis

    server = EmbeddedRedis(run_dir / "redis")
    url = server.start()  # the job stopped its server; its data must reload
    try:
        client = redis.Redis.from_url(url)
        streams = [
            k for k in client.scan_iter("physarum:{toy_grpo}:*") if client.type(k) == b"stream"
        ]
        assert streams
        for key in streams:
            for group in client.xinfo_groups(key):
                assert group["pending"] == 0, f"{key!r}: unacknowledged entries after the job"
        from buffer.store import EpisodeStore

        stats = EpisodeStore(url, "toy_grpo").stats()
        assert stats.groups_acked >= 12  # 3 steps x 4 groups
        assert stats.version == 3
    finally:
        server.stop()


def test_in_job_eval_used_the_trained_weights(rl_run: tuple[Path, dict]) -> None:
    """Greedy eval of the saved model, outside the job, writes exactly the job's final texts."""
    from rollout.worker import RolloutWorkerCore

    run_dir, _ = rl_run
    job = load_job(run_dir / "job.yaml")
    in_job = [json.loads(x) for x in (run_dir / "eval" / "step_3.jsonl").read_text().splitlines()]
    core = RolloutWorkerCore(
        job, model_dir=run_dir / "hf", tokenizer_dir=run_dir / "hf", worker_id="check"
    )
    rows = read_jsonl(run_dir / "data" / "eval.jsonl")[: job.rollout.eval.n_prompts]
    try:
        again = asyncio.run(core.evaluate(rows)).samples
    finally:
        core.shutdown()
    assert len(in_job) == len(rows) == 16
    fresh = {s["id"]: s for s in again}
    for sample in in_job:
        assert sample["response"] == fresh[sample["id"]]["response"], sample["id"]
        assert sample["logprob"] == pytest.approx(fresh[sample["id"]]["logprob"], abs=1e-3)
    # and the trainer did move the weights those samples came from
    from models.checkpoint import from_pretrained

    trained = dict(from_pretrained(run_dir / "hf").hf_state_dict())
    initial = dict(from_pretrained(run_dir / "init").hf_state_dict())
    moved = max((trained[k] - initial[k]).abs().max().item() for k in trained)
    assert moved > 1e-4
