"""The `physarum` command line: config checks, toy data, one readable error line on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import configs
from physarum.cli import main

PRESETS = sorted(str(p) for p in Path(configs.__file__).parent.glob("*.yaml"))


def test_config_validate_accepts_every_preset(capsys) -> None:
    assert main(["config", "validate", *PRESETS]) == 0
    assert capsys.readouterr().out.count("ok  ") == len(PRESETS)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ("rollout:\n  bogus: 1\n", "rollout.bogus: unknown key"),
        ("trainer:\n  steps: lots\n", "trainer.steps"),
        ("buffer:\n  capacity: 0\n", "buffer.capacity: Input should be greater than or equal to 1"),
    ],
)
def test_config_validate_names_the_bad_field(tmp_path: Path, capsys, edit: str, field: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(PRESETS[0]).read_text() + edit)
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("physarum: error: invalid config")
    assert field in err
    assert "Traceback" not in err


def test_data_make_writes_valid_rows_and_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert (
        main(["data", "make", "arithmetic", "--n", "1000", "--seed", "3", "--out", str(first)]) == 0
    )
    assert (
        main(["data", "make", "arithmetic", "--n", "1000", "--seed", "3", "--out", str(second)])
        == 0
    )
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 1000
    assert len({r["id"] for r in rows}) == 1000
    for row in rows:
        assert set(row) >= {"id", "messages", "label", "task"}
        assert row["task"] == "arithmetic" and row["messages"][0]["role"] == "user"
        a, b = row["messages"][0]["content"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["label"])


def test_unknown_task_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["data", "make", "nope", "--n", "3", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "arithmetic" in err and "Traceback" not in err


def test_console_script_is_installed() -> None:
    exe = shutil.which("physarum", path=str(Path(sys.executable).parent))
    assert exe is not None, "the physarum console script is not installed in this environment"
    done = subprocess.run([exe, "config", "validate", PRESETS[0]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_plan_prints_per_stage_memory_of_the_cluster_preset(capsys) -> None:
    preset = str(Path(configs.__file__).parent / "glm46_grpo.yaml")
    assert main(["plan", preset]) == 0
    out = capsys.readouterr().out
    assert "tp 8" in out and "pp 4" in out and "ep 16" in out
    assert out.count("\n    ") >= 4  # one row per pipeline stage
    assert "fits in 80 GiB" in out


def test_plan_refuses_a_torch_job(capsys) -> None:
    toy = str(Path(configs.__file__).parent / "toy_sft.yaml")
    assert main(["plan", toy]) == 2
    assert "trainer.backend" in capsys.readouterr().err
