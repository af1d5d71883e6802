"""The agentic toy run, both stages, and the table of what they did to tool use and accuracy.

Stage 1 (`configs/toy_agentic_sft.yaml`): SFT of a fresh glm4moe-toy on calculator rows, half
of them tool-use demonstrations. Stage 2 (`configs/toy_agentic.yaml`): GRPO with the
calculator environment from the SFT model. Both run on one embedded Ray, and both stages
generate the same held-out rows (same task, seed and size), so every number below is measured
on the same 100 problems.

Printed per checkpoint (the fresh model, after SFT, after RL):

* the in-job evals: tool-call rate and accuracy sampled at temperature 1 (k samples per
  prompt, as the presets say), i.e. what the policy RL trains actually does;
* a greedy eval of the saved checkpoint, run here in-process by the rollout worker core
  (the same multi-turn episode code and reward), as a second view;
* the wall time of each stage. Nothing is timed against a peer: the machine is shared.

Usage: .venv/bin/python bench/agentic_toy.py [--root runs/agentic_toy]
           [--sft-set key=value ...] [--rl-set key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import configs
from configs import JobConfig, load_job
from envs.tasks import read_jsonl
from physarum.cluster import connect
from physarum.launch import execute
from physarum.metrics import format_duration

log = logging.getLogger("bench.agentic_toy")
PRESETS = Path(configs.__file__).parent


def _evals(run_dir: Path) -> list[dict]:
    """The eval records of a run's metrics.jsonl, in step order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval/accuracy" in r]


def _rewards(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["reward"] for r in map(json.loads, lines) if "reward" in r]


def greedy_eval(job: JobConfig, model_dir: Path, tokenizer_dir: Path) -> dict[str, float]:
    """Greedy held-out eval of one checkpoint with the job's rollout worker core (no Ray)."""
    from rollout.worker import RolloutWorkerCore

    rows = read_jsonl(Path(job.resolved_run_dir) / "data" / "eval.jsonl")
    rows = rows[: job.rollout.eval.n_prompts]
    core = RolloutWorkerCore(
        job, model_dir=model_dir, tokenizer_dir=tokenizer_dir, worker_id="bench"
    )
    try:
        return asyncio.run(core.evaluate(rows, k=1, temperature=0.0)).metrics
    finally:
        core.shutdown()


def run_stages(root: Path, sft_set: list[str], rl_set: list[str]) -> dict:
    sft_dir, rl_dir = root / "sft", root / "rl"
    sft_job = load_job(PRESETS / "toy_agentic_sft.yaml", [f"run_dir={sft_dir}", *sft_set])
    warm = [f"model.path={sft_dir / 'hf'}", f"tokenizer.path={sft_dir / 'hf'}"]
    rl_job = load_job(PRESETS / "toy_agentic.yaml", [f"run_dir={rl_dir}", *warm, *rl_set])
    handle = connect(sft_job.cluster, min_cpus=2)  # one Ray for both stages
    try:
        walls = {}
        for name, job in (("sft", sft_job), ("rl", rl_job)):
            started = time.monotonic()
            execute(job, stage=name, overwrite=True)  # a rerun replaces its stages
            walls[name] = time.monotonic() - started
            print(f"agentic_toy: {name} done in {format_duration(walls[name])}", flush=True)
    finally:
        handle.shutdown()
    checkpoints = {
        "fresh model": (sft_dir / "init", sft_dir / "tokenizer"),
        "after SFT": (sft_dir / "hf", sft_dir / "hf"),
        "after RL": (rl_dir / "hf", rl_dir / "hf"),
    }
    greedy = {name: greedy_eval(rl_job, *dirs) for name, dirs in checkpoints.items()}
    sft_evals, rl_evals = _evals(sft_dir), _evals(rl_dir)
    sampled = {
        "fresh model": sft_evals[0],
        "after SFT": sft_evals[-1],
        "after RL": rl_evals[-1],
    }
    return {
        "sampled": sampled,
        "greedy": greedy,
        "rl_start": rl_evals[0],
        "walls": walls,
        "rewards": _rewards(rl_dir),
        "rl_curve": [(r["step"], r["eval/tool_call_rate"], r["eval/accuracy"]) for r in rl_evals],
        "sft_curve": [(r["step"], r["eval/tool_call_rate"], r["eval/accuracy"]) for r in sft_evals],
    }


def print_table(result: dict, sft_job: JobConfig, rl_job: JobConfig) -> None:
    k = sft_job.rollout.eval.k
    n = sft_job.rollout.eval.n_prompts
    print(f"\nagentic toy: calculator task, {n} held-out prompts")
    print(
        f"{'checkpoint':<12} | {'tool-call rate':>14} {'accuracy':>9} "
        f"(T={sft_job.rollout.eval.temperature:g}, k={k}) | "
        f"{'tool-call rate':>14} {'accuracy':>9} (greedy)"
    )
    for name in ("fresh model", "after SFT", "after RL"):
        s, g = result["sampled"][name], result["greedy"][name]
        print(
            f"{name:<12} | {s['eval/tool_call_rate']:>14.3f} {s['eval/accuracy']:>9.3f}"
            f"{'':>11} | {g['eval/tool_call_rate']:>14.3f} {g['eval/accuracy']:>9.3f}"
        )
    start = result["rl_start"]
    print(
        f"(RL's own step-0 eval of the SFT model: tool-call rate "
        f"{start['eval/tool_call_rate']:.3f}, accuracy {start['eval/accuracy']:.3f})"
    )
    print("SFT evals (step, tool-call rate, accuracy):", _fmt(result["sft_curve"]))
    print("RL evals  (step, tool-call rate, accuracy):", _fmt(result["rl_curve"]))
    rewards = result["rewards"]
    head, tail = rewards[: max(1, len(rewards) // 10)], rewards[-max(1, len(rewards) // 10) :]
    print(
        f"RL train reward: first {len(head)} steps {sum(head) / len(head):.3f}, "
        f"last {len(tail)} steps {sum(tail) / len(tail):.3f} "
        f"({rl_job.trainer.steps} steps x {rl_job.trainer.prompts_per_step} prompts x "
        f"{rl_job.rollout.n_samples_per_prompt} samples)"
    )
    walls = result["walls"]
    print(
        f"wall time: SFT {format_duration(walls['sft'])} ({sft_job.trainer.steps} steps), "
        f"RL {format_duration(walls['rl'])} ({rl_job.trainer.steps} steps), on a shared CPU"
    )


def _fmt(curve: list[tuple]) -> str:
    return " ".join(f"({s}, {t:.2f}, {a:.2f})" for s, t, a in curve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/agentic_toy"))
    parser.add_argument("--sft-set", nargs="*", default=[], help="overrides of stage 1")
    parser.add_argument("--rl-set", nargs="*", default=[], help="overrides of stage 2")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
    )
    result = run_stages(args.root, args.sft_set, args.rl_set)
    sft_job = load_job(args.root / "sft" / "job.yaml")
    rl_job = load_job(args.root / "rl" / "job.yaml")
    print_table(result, sft_job, rl_job)
    (args.root / "agentic_summary.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
