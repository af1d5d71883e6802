"""Metrics reach metrics.jsonl, TensorBoard and the progress line; curves are plotted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from configs import LoggingConfig
from physarum.metrics import MetricsSink, ProgressLine, format_duration


def test_sink_writes_jsonl_tensorboard_and_png(tmp_path: Path, caplog) -> None:
    sink = MetricsSink(LoggingConfig(), tmp_path, total_steps=3, stage="rl")
    with caplog.at_level(logging.INFO, logger="physarum.progress"):
        for step in (1, 2, 3):
            sink.log(step, {"reward": 0.1 * step, "eval/accuracy": 0.2 * step, "train/kl": 1e-4})
    sink.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[2]["reward"] == 0.30000000000000004 or abs(lines[2]["reward"] - 0.3) < 1e-9
    assert any((tmp_path / "tb" / "rl").iterdir())
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "step 3/3 | reward 0.300 | acc 0.600 | kl 1.00e-04" in caplog.text
    assert "ETA 0s" in caplog.text


def test_progress_line_eta_and_durations() -> None:
    line = ProgressLine(total_steps=100)
    text = line.update(1, {"reward": 0.5})
    assert text is not None and text.startswith("step 1/100 | reward 0.500")
    assert format_duration(59) == "59s" and format_duration(61) == "1m01s"
    assert format_duration(3700) == "1h01m" and format_duration(float("nan")) == "?"
