"""The bf16 train step of this tree against an older commit's, alternated on the same load.

Each side is a subprocess that imports its own tree (the older commit is `git archive`d into a
temporary directory) and runs bench/trainer_bf16.py's step of that tree: the 40M MoE, one SFT
train step of --seqs x --seq-len tokens, warm-up then --steps timed steps. The sides alternate
--rounds times, so both see the same load. Per side it prints the median wall seconds per
step, this thread's CPU seconds per step (what a loaded machine distorts least) and the minor
page faults per step (fresh memory the step touched), and the after / before ratios.

    .venv/bin/python bench/trainer_bf16_before_after.py --before db80d16        # ~3 min
    .venv/bin/python bench/trainer_bf16_before_after.py --before db80d16 --after 403bb77
    .venv/bin/python bench/trainer_bf16_before_after.py --before db80d16 --dtype float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import torch
sys.path[:0] = [{tree!r}, {tree!r} + "/bench"]
import trainer_bf16 as tb
from models import get_preset
torch.set_num_threads({threads})
config = get_preset("glm4moe-toy", **tb.SHAPE_40M)
step = tb.sft_step(config, {seqs}, {seq_len})
backend = tb.make_backend(config, {dtype!r})
backend.train_step(step.micro_batches)
out = {{"wall": [], "cpu": [], "faults": [], "gflop": tb.step_flops(config, step, {seq_len}) / 1e9}}
for _ in range({steps}):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), time.thread_time()
    backend.train_step(step.micro_batches)
    out["wall"].append(time.perf_counter() - t0)
    out["cpu"].append(time.thread_time() - c0)
    out["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(out))
"""


def export_tree(commit: str, into: Path) -> Path:
    """The files of `commit` (git archive) under into/<commit>."""
    archive = into / "tree.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit],
        check=True,
    )
    tree = into / commit
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def run_child(tree: Path, code: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter from `tree`; its last stdout line is a JSON dict."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"side {tree}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_side(tree: Path, args: argparse.Namespace) -> dict:
    code = CHILD.format(
        tree=str(tree), threads=args.threads, seqs=args.seqs, seq_len=args.seq_len,
        dtype=args.dtype, steps=args.steps,
    )  # fmt: skip
    return run_child(tree, code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", required=True, help="the older commit (any git revision)")
    ap.add_argument("--after", help="a commit to use instead of this working tree")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3, help="before/after alternations")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    print(f"trainer_bf16_before_after: {now}, load average {os.getloadavg()}, {args.threads} "
          f"thread(s), {args.dtype}; before {args.before}, after "
          f"{args.after or f'this tree (HEAD {head} + uncommitted changes)'}")  # fmt: skip
    runs: dict[str, dict[str, list[float]]] = {
        s: {"wall": [], "cpu": [], "faults": []} for s in ("before", "after")
    }
    gflop = 0.0
    with tempfile.TemporaryDirectory(prefix="bf16_before_") as tmp:
        after = export_tree(args.after, Path(tmp)) if args.after else ROOT
        trees = {"before": export_tree(args.before, Path(tmp)), "after": after}
        for r in range(args.rounds):
            for side, tree in trees.items():
                out = run_side(tree, args)
                gflop = out.pop("gflop")
                for key, values in out.items():
                    runs[side][key] += values
                print(f"  round {r + 1} {side:<6} wall {' '.join(f'{w:.3f}' for w in out['wall'])}"
                      f"  cpu {' '.join(f'{c:.3f}' for c in out['cpu'])}  load "
                      f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in runs.items()}
    print(f"\n{'side':<8}{'wall s':>9}{'cpu s':>9}{'faults':>9}{'GFLOP/wall-s':>14}"
          f"{'GFLOP/cpu-s':>13}")  # fmt: skip
    for side, m in med.items():
        print(f"{side:<8}{m['wall']:>9.3f}{m['cpu']:>9.3f}{m['faults']:>9.0f}"
              f"{gflop / m['wall']:>14.1f}{gflop / m['cpu']:>13.1f}")  # fmt: skip
    a, b = med["after"], med["before"]
    print(f"after / before: wall {a['wall'] / b['wall']:.3f}, cpu {a['cpu'] / b['cpu']:.3f}, "
          f"page faults {a['faults'] / max(b['faults'], 1):.2f}; {gflop:.1f} GFLOP a step; "
          f"load average now {os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
