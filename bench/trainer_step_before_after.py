"""The e2e job's trainer step of this tree against an older commit's, alternated, by CPU clock.

The step is what the trainer service does per RL step of `bench/e2e_vs_trl.py` (configs/
toy_grpo.yaml with the bench's overrides: GRPO, ppo_clip, token_mean, no KL, prompt sharing
on, fp32, 1 torch thread), on 8 prompts x 8 samples of the arithmetic task
(tests/trainer/toy.py) travelling through the buffer's codec:

    take      decode_group of the 8 encoded groups (what the store's take hands the trainer)
    build     build_rl_step (the service's perf/cpu_build_s)
    train     backend.train (prepare + forward + loss + backward + optimizer)
    after     the mismatch forensics (top 32 tokens, written as JSONL)
    export    backend.weight_update() (what the rollout gets at staleness 1)

Each side is a fresh subprocess importing its own tree (the older commit `git archive`d into
a temporary directory): warm-up, then --steps steps timed by this thread's CPU clock (the
machine is shared: wall clocks include the other jobs). The sides alternate --rounds times.

    .venv/bin/python bench/trainer_step_before_after.py --before 8ecbaf3
    .venv/bin/python bench/trainer_step_before_after.py --before 8ecbaf3 \\
        --model runs/bench_e2e_vs_trl/warm_start --tokenizer runs/bench_e2e_vs_trl/fixture/tokenizer
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from trainer_bf16_before_after import ROOT, export_tree, run_child

PHASES = ("take", "build", "train", "after", "export")
OVERRIDES = [
    "trainer.share_prompt_prefix=true",
    "trainer.lr=1e-4",
    "trainer.lr_schedule=constant",
    "trainer.grad_clip=1.0",
    "algorithm.kl.coef=0.0",
    "buffer.max_staleness=1",
]

CHILD = """
import json, sys, tempfile, time
from pathlib import Path
sys.path[:0] = [{tree!r}]
import torch
from buffer.codec import decode_group, encode_group
from configs import load_job
from models.checkpoint import from_pretrained
from tests.trainer.toy import arithmetic_groups, make_tokenizer, toy_model
from trainer.batch import build_rl_step
from trainer.forensics import mismatch_path, top_mismatch, write_mismatch
from trainer.torch_backend import TorchBackend
torch.set_num_threads(1)
job = load_job({tree!r} + "/configs/toy_grpo.yaml", {overrides!r})
tok = make_tokenizer({tokenizer!r})
model = from_pretrained({model!r}) if {model!r} else toy_model(len(tok))
blobs = [encode_group(g) for g in arithmetic_groups(tok, 8, 8, seed=0)]
backend = TorchBackend(model, job.trainer, job.algorithm, total_steps=10**6)
out = {{k: [] for k in {phases!r}}}
clock = time.thread_time
with tempfile.TemporaryDirectory() as run_dir:
    for i in range({warmup} + {steps}):
        t0 = clock()
        groups = [decode_group(b) for b in blobs]
        t1 = clock()
        step = build_rl_step(groups, micro_batch_tokens=job.trainer.micro_batch_tokens,
                             temperature=1.0, current_version=backend.version,
                             share_prompt_prefix=True)
        t2 = clock()
        backend.train(step)
        t3 = clock()
        write_mismatch(mismatch_path(Path(run_dir), i), top_mismatch(step.micro_batches, 32))
        t4 = clock()
        backend.weight_update()
        t5 = clock()
        if i >= {warmup}:
            for k, a, b in zip({phases!r}, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                out[k].append(b - a)
print(json.dumps(out))
"""


def run_side(tree: Path, args: argparse.Namespace, tokenizer: str) -> dict[str, list[float]]:
    code = CHILD.format(
        tree=str(tree), overrides=OVERRIDES, tokenizer=tokenizer, phases=PHASES,
        model=str(args.model.resolve()) if args.model else "", warmup=3, steps=args.steps,
    )  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return run_child(tree, code, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", required=True, help="the older commit (any git revision)")
    ap.add_argument("--rounds", type=int, default=4, help="before/after alternations")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    ap.add_argument("--model", type=Path, help="an HF dir (the e2e warm start); else a seeded toy")
    ap.add_argument("--tokenizer", type=Path, help="its tokenizer dir; else the toy tokenizer")
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    print(f"trainer_step_before_after: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
          f"UTC, load average {os.getloadavg()}, torch threads 1 per side; before "
          f"{args.before}, after this tree (HEAD {head} + uncommitted changes)")  # fmt: skip
    runs = {s: {k: [] for k in PHASES} for s in ("before", "after")}
    with tempfile.TemporaryDirectory(prefix="step_before_") as tmp:
        tokenizer = str(args.tokenizer.resolve()) if args.tokenizer else f"{tmp}/tokenizer"
        trees = {"before": export_tree(args.before, Path(tmp)), "after": ROOT}
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
            for side, tree in order:
                out = run_side(tree, args, tokenizer)
                for k, values in out.items():
                    runs[side][k] += values
                total = statistics.median(sum(v) for v in zip(*out.values()))
                print(f"  round {r + 1} {side:<6} step CPU median {total * 1e3:6.2f} ms, "
                      f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"\nCPU ms per step, median of {args.rounds} x {args.steps} steps per side")
    print(f"{'phase':<8}{'before':>9}{'after':>9}{'after/before':>14}")
    for k in (*PHASES, "sum"):
        pick = {s: runs[s][k] if k != "sum" else [sum(v) for v in zip(*runs[s].values())]
                for s in runs}  # fmt: skip
        b, a = (statistics.median(pick[s]) * 1e3 for s in ("before", "after"))
        print(f"{k:<8}{b:>9.2f}{a:>9.2f}{a / b:>14.3f}")
    print(f"load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
