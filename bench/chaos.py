"""Chaos campaign: seeded kill -9 trials of the toy RL job, checked for lost prompts, groups
trained twice and the data order (issue 18 item 7).

Peer: the same job uninterrupted, with the same seed (run first, in this script run). Each
trial kills a rollout worker, the trainer actor, the job's redis-server or the driver (or
one of them twice in a row) at a seeded step and delay; the job recovers by itself or exits
non-zero and `physarum run --resume DIR` finishes it. After each trial the checkpoint's
trained lineage and a copy of the buffer's AOF are audited (physarum/audit.py) against the
reference run's epoch orders. The table lists trials x outcomes.

    .venv/bin/python bench/chaos.py                          # 4 trials (~6 min)
    .venv/bin/python bench/chaos.py --trials 50 --seed 0     # the campaign (about an hour)
    .venv/bin/python bench/chaos.py --summarize a.json b.json  # tables of saved --json rows
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.chaos.trial import TrialPlan, TrialResult, plan_trials, run_trial  # noqa: E402


def _header() -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{now}  load average {load}  torch threads {torch.get_num_threads()}"


def _steps(result: TrialResult) -> dict[int, set[tuple[int | None, str]]]:
    steps: dict[int, set[tuple[int | None, str]]] = collections.defaultdict(set)
    for g in result.lineage:
        steps[g.step].add((g.epoch, g.prompt_id))
    return steps


def _row(r: TrialResult, reference: TrialResult) -> dict:
    ref, got = _steps(reference), _steps(r)
    same = sum(1 for s in ref if got.get(s) == ref[s])
    report = r.report
    return {
        "trial": r.plan.index,
        "kill": r.plan.name,
        "after_step": r.plan.after_step,
        "delay_s": round(r.plan.delay_s, 2),
        "kills": len(r.kills),
        "exits": ",".join(str(x) for x in r.exits),
        "outcome": r.outcome,
        "lost": len(report.lost) if report else None,
        "twice": len(report.twice) if report else None,
        "order_ok": (not report.order) if report else None,
        "steps_as_ref": f"{same}/{len(ref)}",
        "leftovers": r.leftovers,
        "seconds": round(r.seconds, 1),
        "ok": r.ok,
        "error": r.error or (report.summary() if report and not report.ok else ""),
    }


def _print_table(rows: list[dict]) -> None:
    cols = ["trial", "kill", "after_step", "delay_s", "kills", "exits", "outcome", "lost"]
    cols += ["twice", "order_ok", "steps_as_ref", "leftovers", "seconds", "ok"]
    print(" | ".join(cols))
    for row in rows:
        print(
            " | ".join(str(row[c]) for c in cols) + (f"  ({row['error']})" if row["error"] else "")
        )


def _print_summary(rows: list[dict]) -> None:
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        by_kind[row["kill"]][row["outcome"]] += 1
        by_kind[row["kill"]]["trials"] += 1
        by_kind[row["kill"]]["audit failed"] += int(
            bool(row["lost"] or row["twice"]) or not row["order_ok"]
        )
    print("\nkill | trials | recovered by itself | resumed | failed | audit failed")
    for kind in sorted(by_kind):
        c = by_kind[kind]
        counts = [c[k] for k in ("trials", "recovered", "resumed", "failed", "audit failed")]
        print(" | ".join([kind, *map(str, counts)]))
    lost = sum(row["lost"] or 0 for row in rows)
    twice = sum(row["twice"] or 0 for row in rows)
    order = sum(1 for row in rows if row["order_ok"] is False)
    print(
        f"\ntotal: {len(rows)} trials, {sum(r['ok'] for r in rows)} ok; {lost} prompts lost, "
        f"{twice} trained-twice findings, {order} data-order failures, "
        f"{sum(r['leftovers'] for r in rows)} leftover processes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="number of kill trials")
    parser.add_argument("--seed", type=int, default=0, help="seeds target, step and delay")
    parser.add_argument("--root", type=Path, default=None, help="where run dirs go (temp)")
    parser.add_argument("--job-timeout", type=float, default=600, help="bound per job run, s")
    parser.add_argument("--parallel", type=int, default=1, help="trials run side by side")
    parser.add_argument("--keep", action="store_true", help="keep the trials' run dirs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--pace",
        type=float,
        default=0.1,
        help="seconds each episode's reward takes (tests/chaos/pace.py); 0 = unpaced. On an "
        "idle machine an unpaced step takes ~0.05 s and most jobs end before their kill",
    )
    parser.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        default=None,
        help="print the table of the rows saved by earlier runs' --json (a campaign cut short)",
    )
    args = parser.parse_args()
    if args.summarize:
        rows = [row for path in args.summarize for row in json.loads(path.read_text())]
        print(f"chaos: {len(rows)} trials from {', '.join(map(str, args.summarize))}")
        print(f"now: {_header()}\n")
        _print_table(rows)
        _print_summary(rows)
        return
    if args.trials < 1:
        parser.error(f"--trials: must be >= 1, got {args.trials}")
    if args.parallel < 1:
        parser.error(f"--parallel: must be >= 1, got {args.parallel}")
    root = args.root or Path(tempfile.mkdtemp(prefix="physarum-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"chaos: {args.trials} trials, seed {args.seed}, {args.parallel} at a time, "
        f"pace {args.pace} s per episode, in {root}"
    )
    print(f"start: {_header()}")
    started = time.monotonic()
    timing = {"job_timeout_s": args.job_timeout, "pace_s": args.pace}
    reference = run_trial(TrialPlan(-1, (), 0, 0.0), root, **timing)
    if not reference.ok or reference.buffer is None:
        raise SystemExit(f"the reference run failed: {reference.error or reference.report}")
    print(f"reference (uninterrupted): {reference.report.summary()}, {reference.seconds:.0f} s")
    rows: list[dict] = []

    def one(plan: TrialPlan) -> dict:
        result = run_trial(plan, root, reference=reference.buffer, **timing)
        row = _row(result, reference)
        print(
            f"trial {plan.index:3d} {plan.name:16s} step {plan.after_step} +{plan.delay_s:.2f}s: "
            f"{row['outcome']}, exits {row['exits']}, lost {row['lost']}, twice {row['twice']}, "
            f"order ok {row['order_ok']}, {row['seconds']} s, load {os.getloadavg()[0]:.1f} "
            f"{row['error']}",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(root / f"trial_{plan.index}", ignore_errors=True)
        rows.append(row)
        if args.json:  # as it goes: a long campaign cut short still leaves its rows
            args.json.write_text(json.dumps(sorted(rows, key=lambda r: r["trial"]), indent=1))
        return row

    # trials are subprocess trees, so threads are enough to run a few side by side
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, plan_trials(args.trials, args.seed)))
    rows.sort(key=lambda r: r["trial"])
    print(f"\nend: {_header()}  ({(time.monotonic() - started) / 60:.1f} min)\n")
    _print_table(rows)
    _print_summary(rows)


if __name__ == "__main__":
    main()
