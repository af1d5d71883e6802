"""Mismatch forensics end to end, without Ray: an FP8 embedded engine samples R3 episodes, a
real Redis buffer carries them, the trainer service takes one RL step and writes the step's
largest |Δlogprob| tokens; `physarum inspect` prints them decoded with the run's tokenizer,
and the mismatch series reach TensorBoard."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from buffer.episode import EpisodeGroup
from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore
from configs import load_job
from models.chat import prompt_ids
from models.checkpoint import from_pretrained
from models.tokenizer import load_tokenizer
from physarum import inspect as inspect_mod
from physarum.cli import main
from physarum.metrics import MetricsSink
from physarum.prepare import prepare
from physarum.rundir import RunDir
from rollout.embedded import EmbeddedEngine
from rollout.single_turn import generate_group, row_metadata
from rollout.types import SamplingParams
from tests.physarum.test_job import TINY
from trainer import forensics
from trainer.service import TrainerService

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stepped(tmp_path_factory) -> Iterator[tuple[Path, dict[str, float]]]:
    """A run dir after one R3 step (FP8 rollout), and the step's metrics."""
    tmp = tmp_path_factory.mktemp("inspect")
    run = tmp / "run"
    overrides = [*TINY, f"run_dir={run}", "algorithm.moe.routing_replay=rollout",
                 "algorithm.tis.enabled=true", "logging.mismatch_top=12"]  # fmt: skip
    job = load_job(Path("configs/toy_grpo.yaml"), overrides)
    prepared = prepare(job, RunDir(run).create())
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    rows = [json.loads(line) for line in prepared.train_path.read_text().splitlines()[:4]]
    model = from_pretrained(prepared.model_dir, dtype=torch.float32)
    engine = EmbeddedEngine(model, tokenizer=tokenizer, fp8=True, seed=0, context_len=128)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, sampling_seed=1)
    groups = []
    try:
        for i, row in enumerate(rows):
            ids = prompt_ids(tokenizer, row["messages"])
            episodes = asyncio.run(
                generate_group(
                    engine,
                    ids,
                    sampling,
                    4,
                    metadata=row_metadata(row),
                    routed_experts_from=len(ids),
                )
            )
            for j, e in enumerate(episodes):
                e.reward = float(j % 2)
            groups.append(EpisodeGroup(f"p{i}", episodes))
    finally:
        engine.shutdown()
    with EmbeddedRedis(tmp / "redis") as server:
        store = EpisodeStore.from_config(server.url, "inspect", job.buffer)
        store.put_groups(groups)
        trainer = TrainerService(job, prepared.model_dir, store=store, total_steps=1)
        metrics = trainer.rl_step(timeout_s=30)
        store.close()
    yield run, metrics


def test_the_trainer_writes_the_steps_top_tokens(stepped):
    run, metrics = stepped
    path = forensics.mismatch_path(run, 1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 12 and path.stat().st_size < 16_000  # bounded
    diffs = [r["abs_diff"] for r in records]
    assert diffs == sorted(diffs, reverse=True) and diffs[0] > 0
    assert metrics["train/mismatch_abs_diff"] <= diffs[0]  # the step's mean, its max
    for r in records:
        assert r["abs_diff"] == pytest.approx(abs(r["trainer_logprob"] - r["rollout_logprob"]))
        assert r["version"] == 0 and r["staleness"] == 0 and r["policy_version"] == 0
        assert r["finish_reason"] in ("stop", "length") and 0 <= r["position"] < 8
        assert r["replayed"] is (r["position"] > 0)  # R3: all but the first response token
    assert forensics.MISMATCH_DIR == inspect_mod.MISMATCH_DIR


def test_physarum_inspect_prints_tokens_in_context(stepped, capsys):
    run, _ = stepped
    assert main(["inspect", str(run), "--step", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    first = json.loads(forensics.mismatch_path(run, 1).read_text().splitlines()[0])
    tokenizer = load_tokenizer(run / "tokenizer")
    token = tokenizer.decode([first["token_id"]], skip_special_tokens=False)
    assert f"|Δ|={first['abs_diff']:.4f}" in out and f"[[{token}]]".replace("\n", "\\n") in out
    assert "version 0 (staleness 0)" in out and "routing" in out
    assert out.count("\n#") == 3
    assert main(["inspect", str(run)]) == 0  # the latest step by default
    assert main(["inspect", str(run), "--step", "9"]) == 2
    assert "recorded steps are 1..1" in capsys.readouterr().err
    assert main(["inspect", str(run.parent)]) == 2  # not a run with records


def test_mismatch_series_reach_tensorboard(stepped, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, metrics = stepped
    job = load_job(Path("configs/toy_grpo.yaml"), [*TINY, f"run_dir={tmp_path}"])
    sink = MetricsSink(job.logging, tmp_path, total_steps=1, stage="rl")
    sink.log(1, metrics)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb" / "rl"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("mismatch_abs_diff", "mismatch_k3", "tis_clip_frac"):
        assert f"train/{name}" in tags
        assert any(t.startswith(f"train/{name}/finish_") for t in tags)
        assert f"train/{name}/stale_0" in tags
    (value,) = events.Scalars("train/mismatch_abs_diff")
    assert value.value == pytest.approx(metrics["train/mismatch_abs_diff"])
