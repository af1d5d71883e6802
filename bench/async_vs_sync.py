"""Benchmark: one toy GRPO job run synchronously (max_staleness 0) and asynchronously (2).

Both runs are `configs/toy_grpo.yaml` with the same overrides (seed, steps, batch, a small
held-out eval only at the start and the end, no TensorBoard or plot), executed in this process
by `physarum.launch.execute` on one shared embedded Ray. Per step we read the run's
metrics.jsonl, skipping the first --skip steps (start-up, first compilations):

  step      perf/step_s: wall time between two step ends as the trainer sees them
  wait      perf/wait_s: time the trainer waited for the step's episode groups
  busy      step - wait: everything the trainer side does per step (batch building, the
            backend's train, weight export, the driver's logging between steps)
  backend   train/time/step_s: the training backend's own time (logprobs + optimizer step)

How generation time is measured: with max_staleness 0 the rollout worker may not start a
step's batch before the weights of the previous step arrive, so the synchronous trainer waits
for the whole rollout phase of every step (weight transfer and swap, lease, generate, reward,
push). The sync run's median `wait` is the generation time per step; its median `busy` is the
training time per step (its `backend` share is printed too). A perfect pipeline runs a step in
max(generation, training); the goal is async step <= 1.15 x that.

Other engineers share this machine's two cores, so wall times are inflated and vary from
minute to minute. The runs alternate in pairs (ABBA: sync-async, async-sync, ...) and each
async run is judged against the sync run of its pair. Each run prints the load, the machine's
idle cores and the CPU seconds per step of our processes (read from /proc): with no idle core
two services cannot overlap, and the CPU columns show whether async did extra work. Ray starts
workers at niceness 15, leaving them only what other users' processes leave over, so the
bench's own Ray starts them at --worker-niceness 0 (as the driver and redis-server run).
Usage:

    .venv/bin/python bench/async_vs_sync.py [--steps 40] [--skip 5] [--reps 3]
        [--staleness 2] [--worker-niceness 0] [--set rollout.max_new_tokens=16 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from job_cpu import CpuSampler, StepStats  # bench/ is on sys.path (long_tail.py imports both here)

import configs
from configs import load_job
from physarum.cluster import connect
from physarum.launch import execute

PRESET = Path(configs.__file__).parent / "toy_grpo.yaml"
GOAL = 1.15


@dataclass
class Run(StepStats):
    """The measured steps of one job (records of metrics.jsonl after the skipped ones)."""

    staleness: int
    rep: int
    records: list[dict[str, Any]]
    wall_s: float
    load: tuple[float, float]
    """1-minute load average before and after the run."""
    cpu: dict[str, float]
    """While the measured steps ran: mean idle cores of the machine ("idle") and the cores
    each service kept busy ("trainer", "rollout"), from CpuSampler.rates."""

    @property
    def backend_s(self) -> float:
        return self.median("train/time/step_s")

    @property
    def tokens_per_step(self) -> float:
        """Response tokens the trainer took per step (episodes x mean response length)."""
        return statistics.fmean(r["data/episodes"] * r["data/response_len"] for r in self.records)

    def cpu_per_step(self, role: str) -> float:
        """CPU seconds `role` spent per step (its busy cores x the mean step time)."""
        return self.cpu[role] * statistics.fmean(r["perf/step_s"] for r in self.records)

    @property
    def staleness_mean(self) -> float:
        return statistics.fmean(r["buffer/staleness_mean"] for r in self.records)

    @property
    def reward(self) -> float:
        return statistics.fmean(r["reward"] for r in self.records)


def job_overrides(args: argparse.Namespace, staleness: int, rep: int, root: Path) -> list[str]:
    """The same job for every run; only max_staleness, the name and the run dir differ."""
    name = f"async_vs_sync_s{staleness}_r{rep}"
    return [
        f"name={name}",
        f"run_dir={root / name}",
        f"seed={args.seed}",
        f"buffer.max_staleness={staleness}",
        f"trainer.steps={args.steps}",
        "rollout.eval.interval=0",
        f"rollout.eval.n_prompts={args.eval_prompts}",
        "checkpoint.interval=0",
        "checkpoint.save_hf=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        f"logging.level={'INFO' if args.verbose else 'WARNING'}",
        *args.set,
    ]


def measured_records(metrics_path: Path, skip: int) -> list[dict[str, Any]]:
    """Per-step trainer records (those with perf/step_s) after the first `skip` steps."""
    records = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "perf/step_s" in record and record["step"] > skip:
            records.append(record)
    if len(records) < 2:
        raise RuntimeError(
            f"{metrics_path}: {len(records)} measured step(s) after skipping {skip}; "
            "raise --steps or lower --skip"
        )
    return records


def run_one(args: argparse.Namespace, staleness: int, rep: int, root: Path) -> Run:
    job = load_job(PRESET, job_overrides(args, staleness, rep, root))
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with CpuSampler() as cpu:
        execute(job)
    wall = time.monotonic() - started
    records = measured_records(job.resolved_run_dir / "metrics.jsonl", args.skip)
    window = (records[0]["time"] - records[0]["perf/step_s"], records[-1]["time"])
    load = (load_before, os.getloadavg()[0])
    run = Run(staleness, rep, records, wall, load, cpu.rates(*window))
    print(
        f"  rep {rep} staleness {staleness}: median step {run.step_s:.3f} s over "
        f"{len(records)} steps (job wall {wall:.0f} s, load {load[0]:.1f} -> {load[1]:.1f}, "
        f"idle cores {run.cpu['idle']:.2f})",
        flush=True,
    )
    return run


def print_runs(runs: list[Run]) -> None:
    print(
        "\nper run: medians over the measured steps (s); cpu/step = CPU seconds per step of the "
        "trainer actor, the rollout actor,\nthe driver (this process) and redis-server; idle = "
        "mean idle cores of the machine meanwhile"
    )
    header = (
        f"{'rep':>3} {'stale':>5} {'step':>6} {'wait':>6} {'busy':>6} {'backend':>7} "
        f"{'cpu/step trn':>12} {'gen':>5} {'drv':>5} {'redis':>5} {'tok/step':>8} "
        f"{'stale_mean':>10} {'reward':>6} {'load':>11} {'idle':>5}"
    )
    print(header)
    for r in runs:
        print(
            f"{r.rep:>3} {r.staleness:>5} {r.step_s:6.3f} {r.wait_s:6.3f} {r.busy_s:6.3f} "
            f"{r.backend_s:7.3f} {r.cpu_per_step('trainer'):12.3f} "
            f"{r.cpu_per_step('rollout'):5.3f} {r.cpu_per_step('driver'):5.3f} "
            f"{r.cpu_per_step('redis'):5.3f} {r.tokens_per_step:8.0f} "
            f"{r.staleness_mean:10.2f} {r.reward:6.3f} {r.load[0]:5.1f}-{r.load[1]:<5.1f} "
            f"{r.cpu['idle']:5.2f}"
        )


@dataclass
class Pair:
    """One sync run and the async run right after it."""

    sync: Run
    asyn: Run

    @property
    def gen_s(self) -> float:
        return self.sync.wait_s

    @property
    def train_s(self) -> float:
        return self.sync.busy_s

    @property
    def ratio(self) -> float:
        return self.asyn.step_s / max(self.gen_s, self.train_s)

    @property
    def speedup(self) -> float:
        return self.sync.step_s / self.asyn.step_s


def print_summary(pairs: list[Pair]) -> None:
    print(
        "\ngeneration/step = sync median wait; training/step = sync median busy (backend share "
        "in brackets)\nratio = async median step / max(generation, training); goal <= "
        f"{GOAL:.2f}\n"
    )
    print(
        f"{'rep':>3} {'sync step':>9} {'gen/step':>8} {'train/step':>17} {'async step':>10} "
        f"{'ratio':>6} {'sync/async':>10} {'idle sync/async':>15}"
    )
    for i, p in enumerate(pairs):
        train = f"{p.train_s:.3f} [{p.sync.backend_s:.3f}]"
        idle = f"{p.sync.cpu['idle']:.2f}/{p.asyn.cpu['idle']:.2f}"
        print(
            f"{i:>3} {p.sync.step_s:9.3f} {p.gen_s:8.3f} {train:>17} {p.asyn.step_s:10.3f} "
            f"{p.ratio:6.3f} {p.speedup:9.2f}x {idle:>15}"
        )
    ratios = [p.ratio for p in pairs]
    best = min(ratios)
    verdict = "meets" if statistics.median(ratios) <= GOAL else "misses"
    print(
        f"\nratio median {statistics.median(ratios):.3f} (best {best:.3f}, worst "
        f"{max(ratios):.3f}) over {len(pairs)} pair(s): {verdict} the goal of {GOAL:.2f}"
    )
    print_cpu(pairs)


def print_cpu(pairs: list[Pair]) -> None:
    """CPU seconds per step, medians over the runs of each mode: async must cost no more CPU
    than sync; max(trainer, rollout) is the step time two free cores would allow."""

    def med(runs: list[Run], role: str) -> float:
        return statistics.median(r.cpu_per_step(role) for r in runs)

    syncs, asyncs = [p.sync for p in pairs], [p.asyn for p in pairs]
    trn, gen = med(syncs, "trainer"), med(syncs, "rollout")
    print(
        f"CPU s/step (median over runs): trainer {trn:.3f} sync / {med(asyncs, 'trainer'):.3f} "
        f"async, rollout {gen:.3f} sync / {med(asyncs, 'rollout'):.3f} async; "
        f"max(trainer, rollout) in sync = {max(trn, gen):.3f} s"
    )


def check_staleness(runs: list[Run], bound: int) -> None:
    """The runs must respect their bounds; a violation is a bug, not noise."""
    for r in runs:
        worst = max(rec["buffer/staleness_max"] for rec in r.records)
        limit = 0 if r.staleness == 0 else bound
        if worst > limit:
            raise RuntimeError(
                f"rep {r.rep} staleness {r.staleness}: a step trained on groups {worst:.0f} "
                f"versions old (bound {limit})"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="trainer steps per run")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of medians")
    parser.add_argument("--reps", type=int, default=3, help="sync/async pairs, alternated")
    parser.add_argument("--staleness", type=int, default=2, help="max_staleness of async runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts (ends)")
    parser.add_argument("--set", action="append", default=[], help="extra override key=value")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="keep the run dirs here (default: a temp dir, deleted)",
    )
    parser.add_argument(
        "--worker-niceness", type=int, default=0, help="niceness of Ray workers (Ray: 15)"
    )
    parser.add_argument("--verbose", action="store_true", help="job logs and progress lines")
    args = parser.parse_args(argv)
    if args.staleness < 1:
        parser.error("--staleness: the async runs need max_staleness >= 1")
    if args.skip >= args.steps - 1:
        parser.error(f"--skip {args.skip} leaves fewer than 2 of --steps {args.steps}")
    return args


def run_pairs(args: argparse.Namespace, root: Path) -> list[Pair]:
    """--reps pairs of runs in ABBA order on one embedded Ray; prints the per-run table."""
    first = load_job(PRESET, job_overrides(args, 0, 0, root))
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read when Ray starts
    handle = connect(first.cluster, min_cpus=2)
    print(
        f"async_vs_sync: {PRESET.name}, {args.steps} steps (first {args.skip} skipped), "
        f"{first.trainer.prompts_per_step} prompts x {first.rollout.n_samples_per_prompt} "
        f"samples/step, max_new_tokens {first.rollout.max_new_tokens}; staleness 0 vs "
        f"{args.staleness}, {args.reps} pair(s), worker niceness {args.worker_niceness}; "
        f"run dirs under {root}",
        flush=True,
    )
    runs: list[Run] = []
    pairs: list[Pair] = []
    try:
        for rep in range(args.reps):
            order = (0, args.staleness) if rep % 2 == 0 else (args.staleness, 0)
            done = {st: run_one(args, st, rep, root) for st in order}
            runs += [done[st] for st in order]
            pairs.append(Pair(done[0], done[args.staleness]))
    finally:
        handle.shutdown()
    check_staleness(runs, args.staleness)
    print_runs(runs)
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
    )
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        if args.root is None:
            args.root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="avs_")))
        pairs = run_pairs(args, args.root)
    print_summary(pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
