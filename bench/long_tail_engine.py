"""Benchmark: the embedded engine alone on long_tail.py's rollout workload, tokens per CPU-second.

The async modes of bench/long_tail.py are bound by the rollout worker's core, so what the
engine makes per CPU-second on that workload is the lever. This runs that workload without
Ray, the trainer or the buffer: the SFT warm start of a long_tail.py run (--warm), its
training prompts ("count from a to b", lognormal lengths), groups of 8 single-sample
requests per prompt at T=1 and max_new_tokens 176 (as the rollout sends them: one
`generate` call per group), --window groups in flight. It prints generated tokens per
process CPU-second (every thread of the process: engine, asyncio loop), the CPU per group
(all threads, and the event loop's thread alone), forwards (prefill, folded), tokens per
forward and the mean decode batch.

With --path worker each group instead goes through the rollout worker's own code, as in a
job but without Ray and Redis: `RolloutWorkerCore.generate_for_row` (chat template, requests,
the engine, Episodes) and the training scorer (the task's reward), so the event loop's
per-group work is counted too; it also prints the process CPU per group.

With --updates-every K (engine path) the engine runs with partial_rollout false and gets a
weight update (no tensors: the version bump, the decode views rebuilt) after every K finished
groups, as an async job without partial rollouts gets one per trainer step: each drains the
running sequences before anything new is admitted, and the forwards and tokens per CPU-second
show what those drains cost against --updates-every 0 (e.g. `--against . --against-updates 0`).

With --against DIR (a `git worktree` or `git archive` copy of another commit) it alternates
runs of this tree and of DIR, each in a fresh process with PYTHONPATH set to its tree, so both
see the same load; the ratio per pair is printed. Same prompts, seeds and tokens on both
sides when the engine's numerics are unchanged (the token counts show it).

    .venv/bin/python bench/long_tail_engine.py --warm <long_tail --root>/warm [--against DIR]
    .venv/bin/python bench/long_tail_engine.py --warm W --path worker --against DIR
    .venv/bin/python bench/long_tail_engine.py --warm W --against . --fold 256 --against-fold 0
    .venv/bin/python bench/long_tail_engine.py --warm W --against . --updates-every 8 \
        --against-updates 0
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW, CONTEXT, SAMPLES = 176, 208, 8  # as bench/long_tail.py's jobs


def workload(args: argparse.Namespace) -> dict[str, float]:
    """One timed pass after a warm-up pass; the engine of the tree on sys.path."""
    import torch

    from envs.examples.long_tail import LONG_TAIL
    from models.chat import prompt_ids
    from models.checkpoint import from_pretrained
    from models.tokenizer import load_tokenizer
    from rollout.embedded.engine import EmbeddedEngine

    torch.set_num_threads(1)
    tok = load_tokenizer(args.warm)
    rows = LONG_TAIL.make_rows(args.groups, seed=0, split="train")
    if args.path == "worker":
        core = worker_core(args)
        engine = core.engine
        group = worker_group(core, rows)
    else:
        fold = {} if args.fold is None else {"fold_prefill_tokens": args.fold}
        engine = EmbeddedEngine(
            from_pretrained(args.warm),
            tokenizer=tok,
            max_running=64,
            context_len=CONTEXT,
            seed=0,
            partial_rollout=not args.updates_every,
            **fold,
        )
        prompts = [prompt_ids(tok, r["messages"], None) for r in rows]
        group = engine_group(engine, prompts, args.updates_every)

    async def everything() -> int:
        window = asyncio.Semaphore(args.window)
        return sum(await asyncio.gather(*(group(i, window) for i in range(len(rows)))))

    try:
        asyncio.run(everything())  # warm-up: allocations, first decode-weight build
        before, cpu0, loop0 = engine.stats(), time.process_time(), time.thread_time()
        tokens = asyncio.run(everything())
        cpu, after = time.process_time() - cpu0, engine.stats()
        loop = time.thread_time() - loop0  # the event loop's thread (this one)
    finally:
        core.shutdown() if args.path == "worker" else engine.shutdown()
    forwards = after["num_forwards"] - before["num_forwards"]
    decodes = after["num_decode_forwards"] - before["num_decode_forwards"]
    rows_ = after["num_decode_rows"] - before["num_decode_rows"]
    prefills = after["num_prefill_forwards"] - before["num_prefill_forwards"]
    folded = after.get("num_folded_prefills", 0) - before.get("num_folded_prefills", 0)
    return {
        "tokens": tokens,
        "cpu_s": cpu,
        "tok_per_cpu_s": tokens / cpu,
        "ms_per_group": 1e3 * cpu / len(rows),
        "loop_ms_per_group": 1e3 * loop / len(rows),
        "forwards": forwards,
        "prefill_forwards": prefills,
        "folded": folded,
        "tok_per_forward": tokens / forwards,
        "decode_batch": rows_ / decodes,
        "load": os.getloadavg()[0],
        "updates": after["num_updates"] - before["num_updates"],
        "batch_1": after.get("decode_batch_le_1", 0) - before.get("decode_batch_le_1", 0),
        "code": str(Path(sys.modules[EmbeddedEngine.__module__].__file__).parents[2]),
    }


def engine_group(
    engine: Any, prompts: list[list[int]], updates_every: int = 0
) -> Callable[..., Awaitable[int]]:
    """Group i: SAMPLES single-sample requests on the engine (one generate call); with
    `updates_every` K, a weight update (no tensors) is submitted after every K-th group."""
    from models.weight_update import WeightUpdate
    from rollout.types import GenerateRequest, SamplingParams

    finished = [0]

    async def group(i: int, window: asyncio.Semaphore) -> int:
        requests = [
            GenerateRequest(
                list(prompts[i]),
                SamplingParams(max_new_tokens=MAX_NEW, sampling_seed=1000 * i + j),
                f"g{i}_{j}",
            )
            for j in range(SAMPLES)
        ]
        async with window:
            outputs = await engine.generate(requests)
        finished[0] += 1
        if updates_every and finished[0] % updates_every == 0:  # lands once the running drain
            engine.submit_update(WeightUpdate(version=finished[0] // updates_every, buckets=[]))
        return sum(len(o.output_ids) for o in outputs)

    return group


def worker_core(args: argparse.Namespace) -> Any:
    """A RolloutWorkerCore on long_tail.py's job (toy_grpo.yaml with its task and reward)."""
    import configs
    from configs import load_job
    from rollout.worker import RolloutWorkerCore

    preset = Path(configs.__file__).parent / "toy_grpo.yaml"
    job = load_job(
        preset,
        [
            f"model.path={args.warm}",
            f"tokenizer.path={args.warm}",
            "data.task=envs.examples.long_tail:LONG_TAIL",
            "data.task_args={}",
            "reward.plugins=[{name: 'envs.examples.long_tail:count_reward'}]",
            f"rollout.max_new_tokens={MAX_NEW}",
            f"rollout.max_context={CONTEXT}",
            f"rollout.n_samples_per_prompt={SAMPLES}",
            "seed=0",
            *([] if args.fold is None else [f"rollout.fold_prefill_tokens={args.fold}"]),
        ],
    )
    return RolloutWorkerCore(job, model_dir=args.warm, tokenizer_dir=args.warm, worker_id="w0")


def worker_group(core: Any, rows: list[dict[str, Any]]) -> Callable[..., Awaitable[int]]:
    """Group i: the worker's generate_for_row (seeded per row) and its training scorer."""
    score = core._training_scorer()

    async def group(i: int, window: asyncio.Semaphore) -> int:
        sampling = replace(core.sampling, sampling_seed=1000 * i)
        async with window:
            episodes = await core.generate_for_row(rows[i], sampling, SAMPLES, routing=True)
            await score(episodes)
        return sum(e.num_trainable for e in episodes)

    return group


def run_tree(
    tree: Path, args: argparse.Namespace, fold: int | None, updates_every: int
) -> dict[str, float]:
    """This script's --one pass in a fresh process on `tree`'s code."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--warm", str(args.warm)]
    cmd += ["--groups", str(args.groups), "--window", str(args.window), "--path", args.path]
    cmd += [] if fold is None else ["--fold", str(fold)]
    cmd += ["--updates-every", str(updates_every)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: the workload failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def line(name: str, r: dict[str, float]) -> str:
    return (
        f"  {name:<7} {r['tok_per_cpu_s']:>6.0f} tok/CPU-s ({r['tokens']:.0f} tokens in "
        f"{r['cpu_s']:.2f} CPU-s, {r['ms_per_group']:.2f} ms/group of which event loop "
        f"{r.get('loop_ms_per_group', float('nan')):.2f}; {r['forwards']:.0f} "
        f"forwards ({r['prefill_forwards']:.0f} prefill, {r['folded']:.0f} folded), "
        f"{r['tok_per_forward']:.1f} tok/forward, decode batch {r['decode_batch']:.1f} "
        f"({r.get('batch_1', float('nan')):.0f} at 1), {r.get('updates', 0):.0f} updates; "
        f"load {r['load']:.1f}; code {r['code']})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=Path, required=True, help="a long_tail.py SFT dir")
    parser.add_argument("--groups", type=int, default=64, help="prompts (8 samples each)")
    parser.add_argument("--window", type=int, default=16, help="groups in flight")
    parser.add_argument("--against", type=Path, default=None, help="another commit's tree")
    parser.add_argument("--reps", type=int, default=3, help="alternated pairs")
    parser.add_argument(
        "--path",
        choices=("engine", "worker"),
        default="engine",
        help="engine: generate calls only; worker: the rollout worker's group code + reward",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="fold_prefill_tokens of this tree's engine (default: the engine's / config's)",
    )
    parser.add_argument(
        "--against-fold",
        type=int,
        default=None,
        help="the same for the --against side (e.g. --against . --fold 256 --against-fold 0)",
    )
    parser.add_argument(
        "--updates-every",
        type=int,
        default=0,
        help="engine path: partial_rollout false and a weight update every K finished groups",
    )
    parser.add_argument(
        "--against-updates",
        type=int,
        default=None,
        help="--updates-every of the --against side (default: the same)",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.warm / "config.json").is_file():
        parser.error(f"--warm: {args.warm} has no config.json (a long_tail.py --root's warm)")
    if args.updates_every < 0 or (args.against_updates or 0) < 0:
        parser.error("--updates-every / --against-updates: expected >= 0")
    if (args.updates_every or args.against_updates) and args.path == "worker":
        parser.error("--updates-every: only with --path engine (the worker's engine is the job's)")
    if args.one:
        print(json.dumps(workload(args)))
        return 0
    import torch

    torch.set_num_threads(1)
    print(
        f"long_tail_engine: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load "
        f"{os.getloadavg()}, torch threads {torch.get_num_threads()} (each pass: 1), "
        f"{args.groups} groups x {SAMPLES} samples, {args.window} in flight, T=1, "
        f"max_new_tokens {MAX_NEW}, path {args.path}; this tree {ROOT} (fold {args.fold}), "
        f"against {args.against} (fold {args.against_fold}); updates every {args.updates_every} "
        f"groups (against: {args.against_updates})",
        flush=True,
    )
    ratios = []
    for rep in range(args.reps):
        this = run_tree(ROOT, args, args.fold, args.updates_every)
        print(f"pair {rep + 1}:\n" + line("this", this), flush=True)
        if args.against is not None:
            theirs = args.updates_every if args.against_updates is None else args.against_updates
            other = run_tree(args.against, args, args.against_fold, theirs)
            ratios.append(this["tok_per_cpu_s"] / other["tok_per_cpu_s"])
            print(line("against", other) + f"\n  this / against: {ratios[-1]:.2f}", flush=True)
    if ratios:
        print(
            f"this / against per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median {statistics.median(ratios):.2f}; load now {os.getloadavg()}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
