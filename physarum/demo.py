"""`make demo`: SFT -> rejection sampling -> GRPO on 2-digit addition, on one embedded Ray.

Each stage starts from the previous stage's final model and shares its tokenizer and its
held-out set (the same task, seed and size give the same eval.jsonl), so the three held-out
accuracies are directly comparable. The console shows one progress display per stage and
ends with a table (stage, held-out accuracy before -> after, wall time) and where the
curves, the summary and the TensorBoard logs are; the services' logs stay in each stage's
logs/ dir (--verbose shows everything).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import configs
from configs import load_job
from physarum.cluster import connect
from physarum.console import make_console, print_traceback, setup_logging
from physarum.launch import execute
from physarum.metrics import format_duration, plot_curves, read_metrics

log = logging.getLogger("physarum.demo")

PRESETS = Path(configs.__file__).parent
STAGES = (
    ("sft", "toy_sft.yaml"),
    ("rejection_sampling", "toy_rejection_sampling.yaml"),
    ("grpo", "toy_grpo.yaml"),
)
# What a person reads without --verbose: the demo's own lines, the progress of each job, the
# dashboard's URL, and every warning or error from anywhere.
SHOWN = ("physarum.demo", "physarum.progress", "physarum.dashboard")


def first_accuracy(metrics_path: Path) -> float | None:
    """The held-out accuracy of the stage's first eval (its starting model)."""
    for record in read_metrics(metrics_path):
        if "eval/accuracy" in record:
            return float(record["eval/accuracy"])
    return None


def run_demo(root: Path, extra: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    previous: Path | None = None
    started = time.monotonic()
    handle = None
    for index, (stage, preset) in enumerate(STAGES, 1):
        overrides = [f"run_dir={root / stage}", f"name=demo_{stage}"]
        if previous is not None:
            overrides += [f"model.path={previous / 'hf'}", f"tokenizer.path={previous / 'hf'}"]
        overrides += (extra or {}).get(stage, [])
        job = load_job(PRESETS / preset, overrides)
        if handle is None:
            handle = connect(job.cluster, min_cpus=2)
        log.info("stage %d/%d: %s (configs/%s) -> %s", index, len(STAGES), stage, preset, root)
        result = execute(job, stage=stage, overwrite=True)  # a rerun replaces its stages
        results.append(
            {
                "stage": stage,
                "accuracy_before": first_accuracy(root / stage / "metrics.jsonl"),
                "accuracy": result.get("eval/accuracy"),
                "wall_s": round(result["wall_s"], 1),
            }
        )
        previous = root / stage
    if handle is not None:
        handle.shutdown()
    total = time.monotonic() - started
    gain = (results[-1]["accuracy"] - results[0]["accuracy_before"]) * 100
    summary = {"stages": results, "wall_s": round(total, 1), "gain_points": round(gain, 1)}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    combine_curves(root)
    return results


def combine_curves(root: Path) -> Path | None:
    """runs/demo/curves.png: reward and held-out accuracy of every stage in one figure."""
    merged = root / "metrics.jsonl"
    with merged.open("w") as out:
        for stage, _ in STAGES:
            path = root / stage / "metrics.jsonl"
            if path.exists():
                out.write(path.read_text())
    return plot_curves(merged, root / "curves.png")


def _acc(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def results_table(results: list[dict[str, Any]], total_s: float) -> Table:
    """Stage | held-out accuracy before -> after | wall time, and a total row."""
    table = Table(title="make demo: greedy accuracy on the held-out 2-digit additions")
    table.add_column("stage")
    table.add_column("held-out accuracy", justify="center")
    table.add_column("wall time", justify="right")
    for r in results:
        table.add_row(r["stage"], f"{_acc(r['accuracy_before'])} → {_acc(r['accuracy'])}", _wall(r))
    first, last = results[0]["accuracy_before"], results[-1]["accuracy"]
    gain = "" if first is None or last is None else f" ({(last - first) * 100:+.1f} points)"
    table.add_row("total", f"{_acc(first)} → {_acc(last)}{gain}", format_duration(total_s))
    return table


def _wall(result: dict[str, Any]) -> str:
    return format_duration(result["wall_s"])


def print_report(console: Console, root: Path, results: list[dict[str, Any]]) -> None:
    summary = json.loads((root / "demo_summary.json").read_text())
    console.print(results_table(results, summary["wall_s"]))
    console.print(f"curves:      {root / 'curves.png'}", soft_wrap=True)
    console.print(f"summary:     {root / 'demo_summary.json'}", soft_wrap=True)
    console.print(f"TensorBoard: tensorboard --logdir {root}", soft_wrap=True)
    console.print(f"logs:        {root}/<stage>/logs/ (services), metrics.jsonl", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="every log line, services' output too"
    )
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose, show=SHOWN)  # logs and progress: stderr
    root = args.root.absolute()
    try:
        results = run_demo(root)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the failing stage's service and log are named above
        print_traceback(exc)
        return 1
    print_report(make_console(sys.stdout), root, results)  # the results: stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
