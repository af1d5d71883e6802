"""Benchmark: this tree's EpisodeStore against an older commit's, in one process, alternating.

On a shared machine the CPU one run of bench/buffer_vs_redis.py costs moves by 15 % or more
from one run to the next, more than a change to the store does. Here both stores run in
the same process on the same fixture and redis-server, rep by rep (before, after, raw; the
order alternates between reps), so both see the same load. The older `buffer/` is
extracted with `git archive <rev> buffer` into a temporary directory and imported as
`buffer_before` (its `buffer` imports rewritten); the groups are the same objects for both.

Each rep is buffer_vs_redis.py's store-batched loop (put_groups, take_groups, ack; rounds
of --batch groups) on each side and its raw loop (pipelined XADD, XREADGROUP, XACK + XDEL of
the same records). Printed: the date, load average and torch threads; per rep the CPU per
group (this process + redis-server) of each; the medians, and per-rep ratios after/before
and store/raw; with --phases, buffer_vs_redis.py's phase profile of each side. With
--touch-episodes both sides read every taken group's episodes before the ack, as the trainer
does (a store whose decode builds them lazily pays for them there). Usage:

    .venv/bin/python bench/buffer_before_after.py --before dafb804 [--reps 7] [--groups 2000]
        [--phases] [--freeze] [--touch-episodes]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from buffer_loops import Cost, make_groups, run_raw, run_store
from buffer_profile import profile_phases

from buffer.codec import encode_group
from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore

ROOT = Path(__file__).resolve().parent.parent


def load_before(rev: str, into: Path) -> type:
    """EpisodeStore of commit `rev`'s buffer/, importable as the package buffer_before."""
    try:
        tar = subprocess.run(
            ["git", "archive", rev, "buffer"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode().strip()
        raise SystemExit(f"--before: git archive {rev} failed: {message}") from exc
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    package = into / "buffer_before"
    (into / "buffer").rename(package)
    for path in package.glob("*.py"):
        text = re.sub(r"\b(from|import) buffer\b", r"\1 buffer_before", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("buffer_before.store").EpisodeStore


def per_group(cost: Cost, n: int) -> float:
    """CPU microseconds per group, client + server."""
    return (cost.client_cpu + cost.server_cpu) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the older commit (any git rev)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--phases", action="store_true", help="a phase profile of each side")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() the fixture")
    parser.add_argument(
        "--touch-episodes", action="store_true", help="read each taken group's episodes"
    )
    args = parser.parse_args()

    load = os.getloadavg()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{stamp}  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  "
          f"torch threads {torch.get_num_threads()} (unused here)")  # fmt: skip
    groups = make_groups(args.groups, 8, 256, 128)
    records = [encode_group(g) for g in groups]
    n = len(groups)
    with tempfile.TemporaryDirectory() as tmp:
        before_cls = load_before(args.before, Path(tmp) / "src")
        if args.freeze:
            gc.collect()
            gc.freeze()
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        touch = args.touch_episodes
        try:
            sides = {
                "before": lambda: run_store(url, groups, args.batch, "batch", before_cls, touch),
                "after": lambda: run_store(url, groups, args.batch, "batch", EpisodeStore, touch),
                "raw": lambda: run_raw(url, groups, records, args.batch, "raw"),
            }
            costs: dict[str, list[Cost]] = {name: [] for name in sides}
            for rep in range(args.reps):
                order = list(sides) if rep % 2 == 0 else ["after", "before", "raw"]
                for name in order:
                    costs[name].append(sides[name]())
                print(f"  rep {rep}: " + ", ".join(
                    f"{name} {per_group(costs[name][-1], n):.0f} us" for name in sides
                ) + f"  (load {os.getloadavg()[0]:.2f})")  # fmt: skip
            phases = []
            if args.phases:
                phases = profile_phases(url, groups, args.batch, "buffer_before")
                phases += profile_phases(url, groups, args.batch, "buffer")
        finally:
            server.stop()
    report(costs, n, args)
    print("\n".join(phases))
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def report(costs: dict[str, list[Cost]], n: int, args: argparse.Namespace) -> None:
    us = {name: [per_group(c, n) for c in runs] for name, runs in costs.items()}
    client = {name: [c.client_cpu / n * 1e6 for c in runs] for name, runs in costs.items()}
    print(f"{n} groups of 8 x 256 tokens (+128 prompt), batch {args.batch}, {args.reps} reps, "
          f"before = {args.before}, fixture {'frozen' if args.freeze else 'not frozen'}, "
          f"episodes {'read' if args.touch_episodes else 'not read'} after each take; "
          "CPU per group, client + redis-server, median (min-max):")  # fmt: skip
    for name, values in us.items():
        print(f"    {name:7s} {statistics.median(values):5.0f} us ({min(values):.0f}-"
              f"{max(values):.0f}), client {statistics.median(client[name]):.0f} us")  # fmt: skip
    pairs = {
        "after / before (CPU per group)": [a / b for a, b in zip(us["after"], us["before"])],
        "raw / before (store's share of raw)": [r / b for r, b in zip(us["raw"], us["before"])],
        "raw / after": [r / a for r, a in zip(us["raw"], us["after"])],
    }
    for label, ratios in pairs.items():
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(f"    {label:36s} median {statistics.median(ratios):.2f}  per rep: {shown}")


if __name__ == "__main__":
    main()
