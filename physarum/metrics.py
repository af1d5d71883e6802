"""Where metrics go: metrics.jsonl, TensorBoard, the live progress line, the final curves PNG.

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

log = logging.getLogger("physarum.progress")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


class ProgressLine:
    """One line per step: step/total, chosen metrics, and an ETA from the recent step rate."""

    FIELDS = (
        ("reward", "reward"),
        ("eval/accuracy", "acc"),
        ("train/kl", "kl"),
        ("train/loss", "loss"),
        ("rollout/gen_tokens_per_s", "gen tok/s"),
        ("train/tokens_per_s", "train tok/s"),
        ("buffer/staleness_mean", "stale"),
    )

    def __init__(self, total_steps: int, every: int = 1) -> None:
        self.total = total_steps
        self.every = every
        self.start = time.monotonic()
        self.first_step: int | None = None
        self.last: dict[str, Any] = {}

    def update(self, step: int, metrics: dict[str, Any]) -> str | None:
        self.last.update({k: v for k, v in metrics.items() if v is not None})
        if self.first_step is None:
            self.first_step = step - 1
        if step % self.every and step != self.total:
            return None
        done = step - self.first_step
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        for key, label in self.FIELDS:
            if key in self.last:
                parts.append(f"{label} {_fmt(self.last[key])}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"ETA {format_duration(eta)}")
        line = " | ".join(parts)
        log.info(line)
        return line


class MetricsSink:
    """Append metrics per step to JSONL and TensorBoard, print progress, plot at the end."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, total_steps: int, stage: str) -> None:
        self.cfg = cfg
        self.stage = stage
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tb"
        self.png = run_dir / "curves.png"
        self.progress = ProgressLine(total_steps, cfg.log_every)
        self._writer = self._open_tensorboard() if cfg.tensorboard else None
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
        self.progress.update(step, metrics)

    def close(self) -> None:
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
