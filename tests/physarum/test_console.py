"""What a person reads: progress cadence off a terminal, no colour codes in a pipe, one live
bar in a terminal, the demo's results table. Progress is driven by a fake clock: no sleeps."""

from __future__ import annotations

import io
import logging

import pytest

from physarum.console import ConsoleHandler, make_console, setup_logging
from physarum.demo import results_table
from physarum.progress import LiveProgress, PlainProgress, make_progress

ESC = "\x1b["


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(total: int, seconds_per_step: float, *, final_again: bool = False) -> list[int]:
    """Run a PlainProgress over steps 0..total; return the steps that printed a line."""
    clock, printed = FakeClock(), []
    progress = PlainProgress(total, clock=clock, emit=lambda line: printed.append(line))
    for step in range(total + 1):
        progress.update(step, {"reward": 0.5, "eval/accuracy": 0.25, "train/kl": 1e-3})
        clock.now += seconds_per_step
    if final_again:  # a driver's final eval logs the last step once more
        progress.update(total, {"eval/accuracy": 0.75})
    return [int(line.split()[1].split("/")[0]) for line in printed]


def test_fast_steps_print_every_5_percent_not_every_step() -> None:
    steps = drive(1000, seconds_per_step=0.01)  # 10 s would take 1000 steps: 5 % comes first
    assert steps[0] == 0 and steps[-1] == 1000
    assert all(b - a == 50 for a, b in zip(steps, steps[1:-1], strict=False)), steps
    assert len(steps) == 1 + 20  # the first line, then one per 50 steps up to 1000


def test_slow_steps_print_every_10_seconds() -> None:
    steps = drive(100, seconds_per_step=3.0)  # 5 % = 5 steps = 15 s: 10 s (4 steps) first
    gaps = {b - a for a, b in zip(steps, steps[1:-1], strict=False)}
    assert gaps == {4}, steps
    assert steps[-1] == 100


def test_the_last_step_logged_again_prints_no_second_line() -> None:
    steps = drive(10, seconds_per_step=0.01, final_again=True)
    assert steps.count(10) == 1


def test_a_job_that_stops_early_shows_its_last_step_at_close() -> None:
    clock, lines = FakeClock(), []
    progress = PlainProgress(1500, clock=clock, emit=lines.append)
    for step in range(0, 118):  # SFT reached stop_at_accuracy at step 117 of 1500
        progress.update(step, {"eval/accuracy": 0.3})
        clock.now += 0.1
    progress.close()
    progress.close()
    assert [line.split()[1] for line in lines] == ["0/1500", "75/1500", "117/1500"]


def test_plain_line_has_step_metrics_and_eta() -> None:
    clock, lines = FakeClock(), []
    progress = PlainProgress(100, clock=clock, emit=lines.append)
    progress.update(0, {"eval/accuracy": 0.25})
    clock.now += 10.0
    progress.update(10, {"reward": 0.5, "train/kl": 1e-4, "rollout/gen_tokens_per_s": 1234.5})
    assert lines[-1] == (
        "step 10/100 | reward 0.500 | acc 0.250 | kl 1.00e-04 | gen tok/s 1234"
        " | elapsed 10s | ETA 1m30s"
    )
    assert progress.last["eval/accuracy"] == 0.25


def test_no_colour_codes_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # even when the environment asks for colour
    for stream, coloured in ((io.StringIO(), False), (FakeTTY(), True)):
        console = make_console(stream)
        handler = ConsoleHandler(console)
        handler.handle(logging.makeLogRecord({"msg": "disk full", "levelno": logging.ERROR}))
        console.print(results_table(RESULTS, 300.0))
        assert "disk full" in stream.getvalue()
        assert (ESC in stream.getvalue()) is coloured, repr(stream.getvalue()[:200])


def test_quiet_console_shows_info_only_from_the_named_loggers() -> None:
    stream = io.StringIO()
    handler = ConsoleHandler(make_console(stream), show=("physarum",))
    for name, level in (
        ("physarum.progress", logging.INFO),
        ("buffer.redis_server", logging.INFO),
        ("buffer.redis_server", logging.WARNING),
        ("physarumx", logging.INFO),
    ):
        record = {"name": name, "levelno": level, "levelname": logging.getLevelName(level)}
        handler.handle(logging.makeLogRecord({**record, "msg": name}))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "I physarum.progress" in lines[0] and "W buffer.redis_server" in lines[1]


def test_live_bar_in_a_terminal_and_plain_lines_otherwise(caplog) -> None:
    caplog.set_level(logging.INFO)
    root = logging.getLogger()
    for stream, expected in ((FakeTTY(), LiveProgress), (io.StringIO(), PlainProgress)):
        handler = ConsoleHandler(make_console(stream))
        root.addHandler(handler)
        try:
            progress = make_progress(3, "grpo")
            progress.update(1, {"reward": 0.1})  # plain: a log line through the handler
            progress.close()
        finally:
            root.removeHandler(handler)
        assert isinstance(progress, expected)
        assert "1/3" in stream.getvalue()


def test_live_bar_shows_step_reward_accuracy_kl() -> None:
    stream = FakeTTY()
    progress = LiveProgress(3, "grpo", make_console(stream), clock=FakeClock())
    for step in (1, 2, 3):
        progress.update(
            step,
            {"reward": 0.5, "eval/accuracy": 0.625, "train/kl": 0.01, "train/tokens_per_s": 99.0},
        )
    progress.close()
    text = stream.getvalue()
    for part in (
        "grpo",
        "3/3",
        "ETA 0s",
        "reward 0.500",
        "acc 0.625",
        "kl 0.010",
        "train 99 tok/s",
    ):
        assert part in text, (part, text[-400:])


def test_setup_logging_leaves_a_configured_root_alone() -> None:
    before = list(logging.getLogger().handlers)  # pytest's capture handlers
    level = logging.getLogger().level
    try:
        setup_logging(verbose=True, stream=io.StringIO())
        assert logging.getLogger().handlers == before
        assert logging.getLogger().level == level
    finally:
        logging.getLogger().setLevel(level)


RESULTS = [
    {"stage": "sft", "accuracy_before": 0.0, "accuracy": 0.37, "wall_s": 61.0},
    {"stage": "rejection_sampling", "accuracy_before": 0.37, "accuracy": 0.55, "wall_s": 40.0},
    {"stage": "grpo", "accuracy_before": 0.55, "accuracy": 0.625, "wall_s": 150.0},
]


def test_demo_table_has_before_after_and_wall_time() -> None:
    stream = io.StringIO()
    make_console(stream).print(results_table(RESULTS, 251.0))
    text = stream.getvalue()
    assert ESC not in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.count("→") == 1}
    assert "0.370 → 0.550" in rows["rejection_sampling"] and "40s" in rows["rejection_sampling"]
    assert "0.550 → 0.625" in rows["grpo"] and "2m30s" in rows["grpo"]
    assert "0.000 → 0.625 (+62.5 points)" in rows["total"] and "4m11s" in rows["total"]
