"""`physarum run` serves the dashboard unless `--no-dashboard`, for a new job and a resumed one.

The job itself is not run here (execute is replaced by a recorder of the job it gets): this
holds the CLI's wiring; tests/physarum/test_dashboard_browser.py runs a real job's dashboard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from configs import JobConfig, load_job
from physarum import launch
from physarum.cli import main
from physarum.rundir import RunDir


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> list[JobConfig]:
    seen: list[JobConfig] = []

    def record(job: JobConfig, **_: Any) -> dict[str, float]:
        seen.append(job)
        return {"wall_s": 0.0}

    monkeypatch.setattr(launch, "execute", record)
    return seen


@pytest.mark.parametrize(("flags", "served"), [([], True), (["--no-dashboard"], False)])
def test_run_serves_the_dashboard_unless_told_not_to(
    jobs: list[JobConfig], tmp_path: Path, flags: list[str], served: bool
) -> None:
    argv = ["run", "configs/toy_grpo.yaml", "--set", f"run_dir={tmp_path / 'run'}", *flags]
    assert main(argv) == 0
    assert jobs[0].logging.dashboard is served


def test_no_dashboard_applies_to_a_resumed_job(jobs: list[JobConfig], tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").create()
    run.save_job(load_job(Path("configs/toy_grpo.yaml"), [f"run_dir={run.root}"]))
    assert main(["run", "--resume", str(run.root), "--no-dashboard"]) == 0
    assert jobs[0].logging.dashboard is False
