"""W&B logging in offline mode: the run's files are written under run_dir/wandb and every
record of metrics.jsonl is one W&B history row holding the same numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from configs import LoggingConfig, load_job
from configs.loader import ConfigError
from physarum.metrics import MetricsSink, read_metrics
from tests.physarum.wandb_reader import history

pytest.importorskip("wandb", reason="needs wandb: pip install 'physarum-rl[wandb]' (dev set-up)")

SKIP = {"stage", "time"}  # metrics.jsonl's own bookkeeping, not metrics


def assert_wandb_matches_jsonl(run_dir: Path) -> int:
    """Row by row: W&B's `step` and every finite number of the JSONL record are equal;
    non-finite values (NaN) are left out of W&B. Returns the number of rows compared."""
    records, rows = read_metrics(run_dir / "metrics.jsonl"), history(run_dir)
    assert len(rows) == len(records) > 0
    for record, row in zip(records, rows, strict=True):
        expected = {
            k: v
            for k, v in record.items()
            if k not in SKIP and isinstance(v, int | float) and math.isfinite(v)
        }
        logged = {k: v for k, v in row.items() if not k.startswith("_")}
        assert logged == pytest.approx(expected, rel=1e-12, abs=0), record["step"]
    return len(rows)


def test_offline_run_holds_what_metrics_jsonl_holds(tmp_path: Path) -> None:
    job = load_job(Path("configs/toy_grpo.yaml"), [f"run_dir={tmp_path}"])
    (tmp_path / "job.yaml").write_text(json.dumps(job.model_dump(mode="json")))  # YAML ⊃ JSON
    cfg = LoggingConfig(
        tensorboard=False, plot=False, wandb={"project": "physarum-test", "mode": "offline"}
    )
    sink = MetricsSink(cfg, tmp_path, total_steps=3, stage="rl")
    sink.log(0, {"eval/accuracy": 0.125, "eval/seconds": 0.5})
    for step in (1, 2, 3):
        sink.log(step, {"reward": step / 7, "train/kl": 1e-7 * step, "train/tokens": 300 + step})
    sink.log(3, {"eval/accuracy": 0.25, "eval/pass@1": math.nan})  # the final eval, same step
    sink.close()

    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert (run / f"run-{run.name.rsplit('-', 1)[-1]}.wandb").stat().st_size > 0
    assert assert_wandb_matches_jsonl(tmp_path) == 5
    assert "eval/pass@1" not in history(tmp_path)[-1]  # NaN: in the JSONL only


def test_wandb_section_is_validated() -> None:
    job = load_job(Path("configs/toy_grpo.yaml"), ["logging.wandb.project=p"])
    assert job.logging.wandb is not None and job.logging.wandb.mode == "online"
    assert load_job(Path("configs/toy_grpo.yaml"), []).logging.wandb is None
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_job(Path("configs/toy_grpo.yaml"), ["logging.wandb.project=p", "logging.wandb.mode=x"])
    with pytest.raises(ConfigError, match="logging.wandb.project"):
        load_job(Path("configs/toy_grpo.yaml"), ["logging.wandb.mode=offline"])
