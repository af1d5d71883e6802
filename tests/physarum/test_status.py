"""`physarum status RUN_DIR` on a finished tiny RL job, and on the same run dir made to look
live (a driver pid that runs, a dashboard.json); also the services' own log files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from configs import load_job
from physarum.cli import main
from physarum.launch import execute
from tests.physarum.test_job import TINY


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("status") / "run"
    overrides = [f"run_dir={run_dir}", *TINY, "trainer.steps=2", "logging.dashboard=false"]
    execute(load_job(Path("configs/toy_grpo.yaml"), overrides))
    return run_dir


def test_status_of_a_finished_job(finished: Path, capsys) -> None:
    assert main(["status", str(finished)]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    lines = {row.split()[0]: row for row in rows if row and not row.startswith(" ")}
    services = {row.split()[0]: row for row in rows if row.startswith("  ")}
    assert lines["state"].startswith("state      finished")
    assert "step 2/2" in lines["progress"]
    assert "acc " in lines["metrics"] and "reward " in lines["metrics"]
    assert "groups waiting" in lines["buffer"] and "prompts queued" in lines["buffer"]
    assert lines["checkpoint"].endswith(str(finished / "checkpoints" / "step_2"))
    assert lines["dashboard"] == "dashboard  not live"
    assert {"driver-0", "buffer", "trainer-0", "rollout-0"} <= set(services), out
    assert f"log {finished}/logs/trainer-0.log" in services["trainer-0"]
    assert f"log {finished}/logs/rollout-0.log" in services["rollout-0"]

    assert main(["status", str(finished), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == 2
    assert {s["service"] for s in status["services"]} >= {"driver-0", "trainer-0", "rollout-0"}
    assert 0.0 <= status["metrics"]["eval/accuracy"] <= 1.0


def test_services_log_to_their_files_not_the_console(finished: Path) -> None:
    trainer = (finished / "logs" / "trainer-0.log").read_text()
    rollout = (finished / "logs" / "rollout-0.log").read_text()
    assert "[trainer-0 pid=" in trainer and "checkpoint at version 2" in trainer
    assert "[rollout-0 pid=" in rollout and "engine up" in rollout
    assert "\x1b[" not in trainer + rollout


def test_status_of_a_live_job_shows_its_driver_and_dashboard(
    finished: Path, tmp_path: Path, capsys
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("job.yaml", "metrics.jsonl"):
        (live / name).write_text((finished / name).read_text())
    rows = json.loads((finished / "placement.json").read_text())
    for row in rows:
        if row["role"] == "driver":  # this test's process plays the running driver
            row.update(pid=os.getpid(), node_ip="127.0.0.1")
    (live / "placement.json").write_text(json.dumps(rows))
    url = "http://127.0.0.1:8265/?token=abc"
    (live / "dashboard.json").write_text(json.dumps({"url": url, "pid": os.getpid()}))
    time.sleep(0.01)  # placement.json is newer than this process (a reused pid would not be)
    assert main(["status", str(live)]) == 0
    out = capsys.readouterr().out
    assert f"state      running: driver pid {os.getpid()} on 127.0.0.1" in out
    assert f"dashboard  {url}" in out
    assert "checkpoint none yet" in out


def test_status_of_a_dir_that_is_no_run_dir(tmp_path: Path, capsys) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert "has no job.yaml" in capsys.readouterr().err
