"""The progress of one job on the console: a live `rich` bar in a terminal, plain lines otherwise.

`make_progress` picks the display: a `LiveProgress` bar when the console set up by
`physarum.console.setup_logging` is a terminal, else a `PlainProgress` that logs a line every
~10 s or every 5 % of the steps (whichever comes first) and the last step, never one per step.
Both read the same `ProgressState` (step/total, the last metrics, ETA from the step rate) and
take their clock as an argument, so tests drive them with a fake clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from physarum.console import find_console

log = logging.getLogger("physarum.progress")

Clock = Callable[[], float]

# (metric key, label) in display order; a metric the job does not report is left out.
FIELDS = (
    ("reward", "reward"),
    ("eval/accuracy", "acc"),
    ("train/kl", "kl"),
    ("train/loss", "loss"),
    ("rollout/gen_tokens_per_s", "gen tok/s"),
    ("train/tokens_per_s", "train tok/s"),
    ("buffer/staleness_mean", "stale"),
)


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


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:  # rates and counts: decimals there are noise to a reader
            return f"{value:.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


class ProgressState:
    """Step/total, the latest value of every metric, and an ETA from the steps done so far."""

    def __init__(self, total_steps: int, clock: Clock = time.monotonic) -> None:
        self.total = total_steps
        self.clock = clock
        self.start = clock()
        # the first step logged and when: the step rate counts from there (a resumed job
        # starts past 0, and start-up and the first eval are no steps)
        self.first: tuple[int, float] | None = None
        self.step = 0
        self.last: dict[str, Any] = {}

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.last.update({k: v for k, v in metrics.items() if v is not None})
        if self.first is None:
            self.first = (step, self.clock())
        self.step = step

    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float:
        if self.first is None or self.step <= self.first[0]:
            return float("nan")
        rate = (self.clock() - self.first[1]) / (self.step - self.first[0])
        return rate * (self.total - self.step)

    def metrics_text(self, sep: str = " | ") -> str:
        return sep.join(
            f"{label} {format_value(self.last[key])}" for key, label in FIELDS if key in self.last
        )

    def line(self) -> str:
        parts = [f"step {self.step}/{self.total}"]
        if metrics := self.metrics_text():
            parts.append(metrics)
        parts.append(f"elapsed {format_duration(self.elapsed())}")
        parts.append(f"ETA {format_duration(self.eta())}")
        return " | ".join(parts)


class Progress(Protocol):
    state: ProgressState

    @property
    def last(self) -> dict[str, Any]: ...

    def update(self, step: int, metrics: dict[str, Any]) -> str | None: ...

    def close(self) -> None: ...


class PlainProgress:
    """Plain lines for a log file or CI: one when `every_s` seconds or `every_fraction` of the
    steps have passed since the last one (whichever comes first), the first step, and the
    last step once (a driver that logs the last step again, e.g. its final eval, gets no
    second line; one that stops early gets its last step at `close`)."""

    def __init__(
        self,
        total_steps: int,
        *,
        every_s: float = 10.0,
        every_fraction: float = 0.05,
        clock: Clock = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.state = ProgressState(total_steps, clock)
        self.every_s = every_s
        self.every_steps = max(1, math.ceil(total_steps * every_fraction))
        self.emit = emit or log.info
        self._printed_step: int | None = None
        self._printed_at = self.state.start

    @property
    def last(self) -> dict[str, Any]:
        return self.state.last

    def update(self, step: int, metrics: dict[str, Any]) -> str | None:
        self.state.update(step, metrics)
        if not self._due(step):
            return None
        line = self.state.line()
        self._printed_step, self._printed_at = step, self.state.clock()
        self.emit(line)
        return line

    def _due(self, step: int) -> bool:
        if self._printed_step is None:
            return True
        if step == self._printed_step:
            return False  # the same step again: its line is out already
        if step >= self.state.total:
            return True
        return (
            step - self._printed_step >= self.every_steps
            or self.state.clock() - self._printed_at >= self.every_s
        )

    def close(self) -> None:
        """A job that ended early (SFT's stop_at_accuracy, an error) still shows its last step."""
        if self.state.first is not None and self.state.step != self._printed_step:
            self._printed_step = self.state.step
            self.emit(self.state.line())


def _short(value: float) -> str:
    """1234.5 -> 1.2k: tokens/s on a bar."""
    return f"{value / 1000:.1f}k" if abs(value) >= 1000 else f"{value:.0f}"


def bar_text(state: ProgressState) -> str:
    """ETA first, then reward, held-out accuracy, KL and tokens/s (generation if the job
    generates, else training), compact enough for one line of an 80-column terminal."""
    last = state.last
    parts = [f"ETA {format_duration(state.eta())}"]
    for key, label in (("reward", "reward"), ("eval/accuracy", "acc"), ("train/kl", "kl")):
        if key in last:
            parts.append(f"{label} {format_value(last[key])}")
    for key, label in (("rollout/gen_tokens_per_s", "gen"), ("train/tokens_per_s", "train")):
        if key in last:
            parts.append(f"{label} {_short(last[key])} tok/s")
            break
    return "  ".join(parts)


class LiveProgress:
    """One live `rich` bar for the job: stage, bar, step/total, reward, held-out accuracy, KL,
    tokens/s and ETA, redrawn in place; it stays on screen, final, when the job ends."""

    def __init__(self, total_steps: int, stage: str, console: Any, clock: Clock = time.monotonic):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress
        from rich.table import Column

        self.state = ProgressState(total_steps, clock)
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            # one line even on 80 columns: the least important metrics are cut first
            TextColumn("{task.fields[text]}", table_column=Column(no_wrap=True)),
            console=console,
            refresh_per_second=4,
        )
        self._task = self._bar.add_task(stage, total=total_steps, text="starting")
        self._bar.start()

    @property
    def last(self) -> dict[str, Any]:
        return self.state.last

    def update(self, step: int, metrics: dict[str, Any]) -> str | None:
        self.state.update(step, metrics)
        self._bar.update(self._task, completed=step, text=bar_text(self.state))
        return None

    def close(self) -> None:
        self._bar.refresh()
        self._bar.stop()


def make_progress(total_steps: int, stage: str, *, every: int = 1) -> Progress:
    """The display for one job: a live bar on a terminal console, plain lines otherwise.
    `every` (logging.log_every) widens the step interval of the plain lines."""
    console = find_console()
    if console is not None and console.is_terminal:
        return LiveProgress(total_steps, stage, console)
    progress = PlainProgress(total_steps)
    progress.every_steps = max(progress.every_steps, every)
    return progress
