"""End to end: GRPO with TRL's `GRPOTrainer` against a Physarum `rl` job, in one script.

Both sides run on the same toy GLM-4 MoE (glm4moe-toy), the same toy tokenizer and chat
template, the same arithmetic rows (2-digit addition), the same SFT warm start (plain torch
cross-entropy, `bench/common.py`), the same reward (`rewards` built-in `arithmetic`, wrapped in
TRL's reward signature for TRL), and the same per-step shape: 8 prompts x 8 samples,
max 8 new tokens, temperature 1.0, lr 1e-4 constant, no KL, token-level loss with clip-higher
(TRL loss_type "dapo", epsilon 0.2 / epsilon_high 0.28; ours ppo_clip + token_mean, 0.2 / 0.28).
TRL runs with the CPU settings it needs (use_cpu, no bf16, no vLLM, no gradient checkpointing).

Printed: wall time per step (median after --skip warm-up steps; TRL split into generation,
scoring and training), the speed-up, batch-reward curves, and held-out greedy accuracy of the
warm start and of each final model, all judged by one evaluator (transformers' generate).

    .venv/bin/python bench/e2e_vs_trl.py                # 100 steps; ours at max_staleness 0 and 1
    .venv/bin/python bench/e2e_vs_trl.py --steps 2500   # the length of the TRL reference
    .venv/bin/python bench/e2e_vs_trl.py --warm-start runs/bench_e2e_vs_trl/warm_start
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import (  # bench/common.py: the script's own directory is on sys.path
    Fixture,
    RunResult,
    build_fixture,
    greedy_accuracy,
    print_report,
    sft_warm_start,
)
from e2e_timeline import format_timeline, step_timeline
from e2e_trl_side import (
    CLIP_HIGH,
    CLIP_LOW,
    LR,
    MAX_NEW,
    PROMPTS,
    SAMPLES,
    TEMPERATURE,
    require_trl,
    run_trl,
)
from job_cpu import CpuSampler

import configs
from envs.tasks import read_jsonl

log = logging.getLogger("bench.e2e_vs_trl")


class JobLoopUnavailable(RuntimeError):
    """physarum.launch cannot be imported: only the TRL half of the benchmark can run."""


# --------------------------------------------------------------------------------------------
# Physarum


def ours_overrides(
    fixture: Fixture,
    warm: Path,
    run_dir: Path,
    *,
    steps: int,
    staleness: int,
    seed: int,
    dtype: str = "float32",
    share: bool = True,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`--set` overrides turning configs/toy_grpo.yaml into the benchmark's job; `extra`
    (the script's own --set) comes last, so it wins."""
    n_eval = len(read_jsonl(fixture.eval_path))
    return [
        f"trainer.dtype={dtype}",
        f"trainer.share_prompt_prefix={str(share).lower()}",
        f"run_dir={run_dir}",
        f"name=bench_e2e_s{staleness}",
        f"seed={seed}",
        f"model.path={warm}",
        f"tokenizer.path={fixture.tokenizer_dir}",
        f"data.train_path={fixture.train_path}",
        f"data.eval_path={fixture.eval_path}",
        f"trainer.steps={steps}",
        f"trainer.prompts_per_step={PROMPTS}",
        f"trainer.lr={LR}",
        "trainer.lr_schedule=constant",
        "trainer.warmup_steps=0",
        "trainer.grad_clip=1.0",
        f"rollout.n_samples_per_prompt={SAMPLES}",
        f"rollout.max_new_tokens={MAX_NEW}",
        f"rollout.temperature={TEMPERATURE}",
        "rollout.eval.interval=0",
        f"rollout.eval.n_prompts={n_eval}",
        f"buffer.max_staleness={staleness}",
        "algorithm.advantage=grpo",
        "algorithm.policy_loss=ppo_clip",
        "algorithm.loss_agg=token_mean",
        f"algorithm.eps_clip_low={CLIP_LOW}",
        f"algorithm.eps_clip_high={CLIP_HIGH}",
        "algorithm.kl.coef=0.0",
        "checkpoint.interval=0",
        "logging.tensorboard=false",
        "logging.plot=false",
        *extra,
    ]


def run_ours(
    fixture: Fixture,
    warm: Path,
    run_dir: Path,
    *,
    steps: int,
    staleness: int,
    seed: int,
    dtype: str = "float32",
    share: bool = True,
    extra: tuple[str, ...] = (),
    skip: int = 2,
) -> tuple[RunResult, dict[str, float]]:
    """One run of ours; the result and its step timeline (bench/e2e_timeline.py)."""
    try:
        from physarum.launch import execute
    except ImportError as err:
        raise JobLoopUnavailable(f"physarum.launch: {err}") from err
    from configs import load_job
    from physarum.metrics import read_metrics

    preset = Path(configs.__file__).parent / "toy_grpo.yaml"
    overrides = ours_overrides(
        fixture, warm, run_dir, steps=steps, staleness=staleness, seed=seed, dtype=dtype,
        share=share, extra=extra,
    )  # fmt: skip
    job = load_job(preset, overrides)
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start from scratch
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with CpuSampler() as cpu:  # CPU per process per step: the step's timeline
        execute(job)
    wall = time.monotonic() - started
    records = read_metrics(run_dir / "metrics.jsonl")
    steps_done = sorted((r for r in records if "reward" in r), key=lambda r: r["step"])
    start = next(r["time"] for r in records if r["step"] == 0)  # after the initial eval
    times = [start] + [r["time"] for r in steps_done]
    phases = {
        "wait": [r["perf/wait_s"] for r in steps_done],
        "train": [r["train/time/train_step_s"] for r in steps_done],
    }
    result = RunResult(
        name=f"physarum s{staleness}"
        + ("" if dtype == "float32" else " bf16")
        + ("" if share else " unshared"),
        step_s=[b - a for a, b in zip(times, times[1:])],  # driver wall clock, step to step
        rewards=[float(r["reward"]) for r in steps_done],
        wall_s=wall,
        final_dir=str(run_dir / "hf"),
        phases=phases,
        load_avg=(load_before, os.getloadavg()[0]),
    )
    return result, step_timeline(records, cpu, skip)


# --------------------------------------------------------------------------------------------
# Report


def prepare_inputs(args: argparse.Namespace) -> tuple[Fixture, Path, dict[str, float]]:
    fixture = build_fixture(
        args.root / "fixture", n_train=args.n_train, n_eval=args.n_eval, seed=args.seed
    )
    if args.warm_start is not None:
        return fixture, args.warm_start, {}
    warm = args.root / "warm_start"
    recipe = {
        "max_steps": args.sft_max_steps,
        "target_accuracy": args.sft_target,
        "lr": args.sft_lr,
        "seed": args.seed,
        "n_train": args.n_train,
        "batch_size": 64,
    }
    marker = warm / "bench_sft.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe:
        stats = json.loads(marker.read_text())["stats"]
        log.info("reusing the SFT warm start in %s (same recipe)", warm)
        return fixture, warm, stats | {"sft/seconds": 0.0}
    stats = sft_warm_start(
        fixture,
        warm,
        max_steps=args.sft_max_steps,
        batch_size=64,
        lr=args.sft_lr,
        target_accuracy=args.sft_target,
        seed=args.seed,
    )
    marker.write_text(json.dumps({"recipe": recipe, "stats": stats}))
    log.info("SFT warm start: %s -> %s", stats, warm)
    return fixture, warm, stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps of each run")
    parser.add_argument("--root", type=Path, default=Path("runs/bench_e2e_vs_trl"))
    parser.add_argument(
        "--staleness", type=int, nargs="*", default=[0, 1], help="max_staleness of our runs"
    )
    parser.add_argument(
        "--warm-start", type=Path, default=None, help="an HF dir to start from (skips the SFT)"
    )
    parser.add_argument("--sft-max-steps", type=int, default=1000)
    parser.add_argument(
        "--sft-target", type=float, default=0.5, help="stop SFT at this train-prompt accuracy"
    )
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of this process (SFT, TRL, eval)"
    )
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of medians")
    parser.add_argument(
        "--reps", type=int, default=1, help="alternate the runs this many times (busy machine)"
    )
    parser.add_argument(
        "--dtype",
        nargs="*",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="trainer.dtype of our runs (bfloat16: bf16 compute, fp32 master weights)",
    )
    parser.add_argument(
        "--share-prompt-prefix",
        nargs="*",
        default=["on"],
        choices=["on", "off"],
        help="trainer.share_prompt_prefix of our runs (on: each group's prompt computed once)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra override of our job (configs/toy_grpo.yaml), after the script's own",
    )
    parser.add_argument("--no-trl", "--skip-trl", action="store_true", help="our runs only")
    parser.add_argument("--no-ours", "--trl-only", action="store_true", help="TRL only")
    return parser.parse_args(argv)


def run_rep(
    args: argparse.Namespace, fixture: Fixture, warm: Path, rep: int, timelines: list[str]
) -> list[RunResult]:
    """TRL, then ours at each staleness, all from the same warm start; each of our runs adds
    its step timeline to `timelines`."""
    runs: list[RunResult] = []
    if not args.no_trl:
        runs.append(run_trl(fixture, warm, args.root / "trl", steps=args.steps, seed=args.seed))
    shares = [v == "on" for v in args.share_prompt_prefix]
    ours = [(k, d, sh) for sh in shares for d in args.dtype for k in args.staleness]
    for k, dtype, share in [] if args.no_ours else ours:
        try:
            run_dir = args.root / (f"physarum_s{k}_{dtype}" + ("" if share else "_unshared"))
            run, timeline = run_ours(
                fixture, warm, run_dir, steps=args.steps, staleness=k, seed=args.seed,
                dtype=dtype, share=share, extra=tuple(args.sets), skip=args.skip,
            )  # fmt: skip
            runs.append(run)
            timelines.append(format_timeline(f"{run.name} #{rep}", timeline))
        except JobLoopUnavailable as err:
            print(f"physarum s{k}: job loop not available, our side skipped ({err})")
    eval_rows = read_jsonl(fixture.eval_path)
    for run in runs:  # each run overwrites its directory next rep: evaluate it now
        run.rep = rep
        run.accuracy = greedy_accuracy(Path(run.final_dir), fixture.tokenizer_dir, eval_rows)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_trl:
        require_trl("e2e_vs_trl.py")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    print(
        f"e2e_vs_trl: {datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
        f"{os.getloadavg()}, torch threads {torch.get_num_threads()} (each of our actors: 1)"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    fixture, warm, sft_stats = prepare_inputs(args)
    eval_rows = read_jsonl(fixture.eval_path)
    warm_acc = greedy_accuracy(warm, fixture.tokenizer_dir, eval_rows)
    log.info("warm start held-out greedy accuracy %.3f", warm_acc)
    results: list[RunResult] = []
    timelines: list[str] = []
    for rep in range(args.reps):  # alternate the systems so machine load hits them alike
        results += run_rep(args, fixture, warm, rep, timelines)
    print_report(results, skip=args.skip, start_accuracy=warm_acc, steps=args.steps, peer="trl")
    if timelines:
        print("\n== where our step goes (bench/e2e_timeline.py; medians per step) ==")
        print("\n".join(timelines))
    total = time.monotonic() - started
    print(f"\nwhole script {total:.0f} s (SFT {sft_stats.get('sft/seconds', 0.0):.0f} s)")
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "warm_start_accuracy": warm_acc,
        "sft": sft_stats,
        "runs": [asdict(r) for r in results],
        "script_s": total,
    }
    (args.root / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
