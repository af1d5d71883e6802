"""Where metrics go: metrics.jsonl, TensorBoard, the job's progress display, the curves PNG.

`MetricsSink` is the one object the driver logs to. Every destination can be switched off in
`logging`; a disabled destination is a no-op, never a branch in the driver.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from configs import LoggingConfig
from physarum.progress import PlainProgress as ProgressLine  # its old name
from physarum.progress import format_duration, make_progress
from physarum.wandb_sink import WandbSink

__all__ = ["MetricsSink", "ProgressLine", "format_duration", "plot_curves", "read_metrics"]

log = logging.getLogger("physarum.progress")


class MetricsSink:
    """Append metrics per step to JSONL and TensorBoard, show progress, plot at the end."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, total_steps: int, stage: str) -> None:
        self.cfg = cfg
        self.stage = stage
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tb"
        self.png = run_dir / "curves.png"
        # a live bar on a terminal, a plain line every ~10 s / 5 % of the steps otherwise
        self.progress = make_progress(total_steps, stage, every=cfg.log_every)
        self._writer = self._open_tensorboard() if cfg.tensorboard else None
        self._wandb = WandbSink(cfg.wandb, run_dir, stage) if cfg.wandb else None
        self.history: list[dict[str, Any]] = []

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but never fail a job over it
            log.warning("tensorboard is not importable; TensorBoard logging is off")
            return None
        return SummaryWriter(log_dir=str(self.tb_dir / self.stage))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"stage": self.stage, "step": step, "time": time.time(), **metrics}
        self.history.append(record)
        if self.cfg.jsonl:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, metrics)
        self.progress.update(step, metrics)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()
        self.progress.close()
        if self._writer is not None:
            self._writer.close()
        if self.cfg.plot and self.cfg.jsonl and self.path.exists():
            plot_curves(self.path, self.png)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Plot reward and held-out accuracy against step, one line per stage."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "reward", "batch reward"),
        (axes[1], "eval/accuracy", "held-out accuracy"),
    ):
        for stage in dict.fromkeys(r["stage"] for r in records):
            points = [(r["step"], r[key]) for r in records if r["stage"] == stage and key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
