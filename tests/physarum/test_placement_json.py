"""A toy RL job with two trainer ranks on an embedded Ray, started from a relative run dir:
the ranks meet at rank 0's address, every actor lands in placement.json, the run dir and
the paths handed to actors are absolute, and the private Redis has a 0600 password."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from configs import load_job
from physarum.launch import execute
from tests.physarum.test_job import TINY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("placement")
    overrides = [
        "run_dir=relative/run",  # relative to the driver's cwd, which actors do not share
        *TINY,
        "trainer.num_ranks=2",
        "trainer.steps=2",
        "rollout.eval.interval=0",
        "rollout.eval.n_prompts=4",
        "checkpoint.interval=0",
        "cluster.num_cpus=3",
        "cluster.trainer_resources={trainer_node: 1}",
    ]
    job = load_job(REPO / "configs/toy_grpo.yaml", overrides)
    cwd = Path.cwd()
    os.chdir(base)
    try:
        execute(job)
    finally:
        os.chdir(cwd)
    return base / "relative" / "run"


def test_placement_json_names_every_actor(two_rank_run: Path) -> None:
    rows = json.loads((two_rank_run / "placement.json").read_text())
    roles = [(r["role"], r["rank"]) for r in rows]
    assert roles == [("driver", 0), ("buffer", 0), ("trainer", 0), ("trainer", 1), ("rollout", 0)]
    for row in rows:
        assert set(row) == {"role", "rank", "node_id", "node_ip", "pid", "device", "gpu_ids"}
        assert row["pid"] > 0 and row["node_ip"] and len(row["node_id"]) > 20
        assert row["gpu_ids"] == []
    trainer_pids = {r["pid"] for r in rows if r["role"] == "trainer"}
    assert len(trainer_pids) == 2  # two processes that met in one process group
    assert {r["device"] for r in rows if r["role"] in ("trainer", "rollout")} == {"cpu"}
    assert len({r["node_id"] for r in rows}) == 1  # one machine


def test_run_dir_and_paths_saved_absolute(two_rank_run: Path) -> None:
    saved = yaml.safe_load((two_rank_run / "job.yaml").read_text())
    assert saved["run_dir"] == str(two_rank_run)
    assert (two_rank_run / "hf" / "config.json").exists()
    assert not (two_rank_run / ".node_check").exists()


def test_private_redis_password_is_0600_and_required(two_rank_run: Path) -> None:
    path = two_rank_run / "redis" / "password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = path.read_text().strip()
    assert len(password) >= 32
    conf = (two_rank_run / "redis" / "redis.conf").read_text()
    assert "bind 127.0.0.1" in conf and f'requirepass "{password}"' in conf
