"""Benchmark: GRPO on a long-tail task, synchronous against asynchronous and partial rollouts.

The task (envs/examples/long_tail.py) is "count from a to b" with b - a + 1 drawn lognormal
(median 2 items, sigma 1.1, clipped at 40): most answers are a few tokens, about one in a
hundred is 10-30x the median. The script builds the toy tokenizer and a fresh glm4moe-toy
model, warm-starts it with a short SFT (plain cross-entropy, bench/common.py's helpers), prints
the measured length distribution of the reference answers, then runs the same GRPO job
(configs/toy_grpo.yaml with the same seed, data and warm start) in each mode, one after the
other on one embedded Ray:

  sync      buffer.max_staleness 0 (on-policy; a weight update never meets a generation)
  async1/2  max_staleness 1 / 2, rollout.partial_rollout false: a weight update waits until
            the engine's running generations finish (AReaL's non-interruptible mode)
  partial2  max_staleness 2, partial_rollout true: the update lands between two decode
            steps and long generations continue under the new weights (both versions tagged)

Every asynchronous mode runs with rollout.max_ready_groups --max-ready (default --prompts,
one trainer batch; 0 = off, as before 2026-12-07 18:30): the worker leases no prompt while 8 of
its groups wait in the buffer untaken, so the staleness window is spent generating (fuller
decode batches, fewer forwards) and groups are trained sooner after their lease (staleness
1 for about half of async2's groups instead of about a third). The sync mode never has a
group waiting beyond the batch the trainer takes, so the setting would not change it; it
runs without it.

Per mode, over the steps after --skip: trained tokens/s (response tokens the trainer took /
wall time), median step time, that over max(generation, training) where generation = the sync
run's median trainer wait and training = its median busy time (step - wait), the trainer's
idle fraction (sum of waits / sum of steps), the staleness histogram of the groups trained
(buffer/staleness_hist), the episodes generated across an update, and the held-out greedy
reward and exact-answer rate (eval at the start and the end, same prompts for every mode).
Other engineers share this machine: the load average is printed beside every run.

    .venv/bin/python bench/long_tail.py [--steps 20] [--skip 4] [--modes sync,async1,...]
        [--model toy|small-36M]
        [--sft-steps 400] [--set algorithm.tis.enabled=false ...]
        [--seed N] [--data-seed 0] [--warm DIR] [--eval-prompts 128] [--reps 3]
        [--fold-prefill-tokens 0] [--max-ready N]

--model small-36M runs the same job on a 36M-parameter policy (11M active; bench/
decode_bound.py's shape) instead of the 1.8M glm4moe-toy: its decode step reads its weights
from DRAM, so a step of a few straggling rows costs nearly what a full batch does (bench/
engine_batch_curve.py: a token alone 7.8x a token in a batch of 64, against the toy's
flatter curve), the regime where the long tail is what asynchronous rollout saves. Its SFT
warm start (~6 min) computes each batch in 4 length-sorted pieces (the same mean gradient).

Every mode runs with the config's rollout.fold_prefill_tokens, 0 (--fold-prefill-tokens N
folds a newcomer's prefill of up to N tokens into the running sequences' decode forward; in the
06:29-06:37 UTC quiet pass it did not move the ratio: async2 1.74x sync with 256 over 5 reps,
1.79x with 0 over 3; bench/long_tail_engine.py measures the engine alone).

--seed changes the GRPO job only (sampling, prompt order); --data-seed the rows, the init and
the SFT, so runs with several --seed values can share one warm start (--warm DIR: the `warm`
folder of an earlier run's --root with the same --data-seed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from async_vs_sync import CpuSampler  # bench/ is on sys.path
from common import _sft_batch, _sft_examples, load_hf_model, toy_model_config
from decode_bound import SMALL_36M
from long_tail_report import Run, generated_lengths, print_reps, print_table, read_run

import configs
from configs import load_job
from envs.examples.long_tail import LONG_TAIL
from envs.tasks import tokenizer_corpus, write_jsonl
from models import Glm4MoeForCausalLM, save_pretrained
from models.tokenizer import build_toy_tokenizer, load_tokenizer
from physarum.cluster import connect
from physarum.launch import execute

PRESET = Path(configs.__file__).parent / "toy_grpo.yaml"
MODES: dict[str, tuple[int, bool]] = {  # name -> (max_staleness, partial_rollout)
    "sync": (0, False),
    "async1": (1, False),
    "async2": (2, False),
    "partial1": (1, True),
    "partial2": (2, True),
}
MODEL_SHAPES: dict[str, dict[str, Any]] = {  # --model: glm4moe-toy's fields replaced
    "toy": {},  # 1.8M parameters: a decode step costs about the same per row at any batch
    "small-36M": SMALL_36M,  # 36M (11M active): a step's weights come from DRAM, batch pays
}
SFT_CHUNKS = {"toy": 1, "small-36M": 4}  # length-sorted pieces per SFT batch (same gradient)
MAX_NEW, MAX_CONTEXT = 176, 208  # the longest reference answers are ~155 tokens


@dataclass(frozen=True)
class Fixture:
    tokenizer_dir: Path
    train_path: Path
    eval_path: Path
    warm_dir: Path


def build_fixture(root: Path, args: argparse.Namespace) -> Fixture:
    """Tokenizer, rows, a fresh toy model and its SFT warm start (same seed, same files)."""
    corpus = tokenizer_corpus(seed=0) + LONG_TAIL.corpus_lines(2000, seed=0)
    tok = build_toy_tokenizer(root / "tokenizer", corpus)
    train = LONG_TAIL.make_rows(args.train_rows, seed=args.data_seed, split="train")
    held_out = LONG_TAIL.make_rows(args.eval_prompts, seed=args.data_seed, split="test")
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(held_out, root / "eval.jsonl")
    print_lengths(tok, train)
    config = dataclasses.replace(toy_model_config(tok), **MODEL_SHAPES[args.model])
    if args.warm is not None:  # an earlier run's warm start (same --data-seed and rows)
        print(f"SFT warm start: reused {args.warm}", flush=True)
        return Fixture(root / "tokenizer", root / "train.jsonl", root / "eval.jsonl", args.warm)
    torch.manual_seed(args.data_seed)
    save_pretrained(Glm4MoeForCausalLM(config), root / "init")
    sft(root / "init", root / "warm", tok, train, args)
    return Fixture(root / "tokenizer", root / "train.jsonl", root / "eval.jsonl", root / "warm")


def print_lengths(tok: Any, rows: list[dict]) -> None:
    """The reference answers' token counts (+1 for the stop token): the tail the policy meets."""
    lengths = np.array([len(tok.encode(r["label"], add_special_tokens=False)) + 1 for r in rows])
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    print(
        f"reference answer tokens over {len(rows)} train rows (lognormal items, median 2, "
        f"sigma 1.1): p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}, "
        f"mean {lengths.mean():.1f}; max/p50 = {lengths.max() / p50:.1f}x",
        flush=True,
    )


def sft(init: Path, out: Path, tok: Any, rows: list[dict], args: argparse.Namespace) -> None:
    """Plain token cross-entropy on the reference answers for --sft-steps steps."""
    started = time.monotonic()
    examples = _sft_examples(tok, rows)
    model = load_hf_model(init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    rng = random.Random(args.data_seed)
    losses = []
    chunks = SFT_CHUNKS[args.model]
    for step in range(args.sft_steps):
        batch = rng.sample(examples, 32)
        if chunks == 1:
            loss = model(**_sft_kwargs(batch, tok.pad_token_id)).loss
            loss.backward()
        else:
            loss = _sft_chunked_backward(model, batch, chunks, tok.pad_token_id)
        if (step + 1) % 50 == 0 and chunks > 1:
            print(f"  SFT step {step + 1}/{args.sft_steps}, loss {loss.item():.4f}", flush=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    print(
        f"SFT warm start: {args.sft_steps} steps, last-50 loss "
        f"{statistics.fmean(losses[-50:]):.4f}, {time.monotonic() - started:.0f} s",
        flush=True,
    )


def _sft_kwargs(batch: list, pad_id: int) -> dict[str, torch.Tensor]:
    ids, attention, labels = _sft_batch(batch, pad_id)
    return dict(input_ids=ids, attention_mask=attention, labels=labels)


def _sft_chunked_backward(model: Any, batch: list, chunks: int, pad_id: int) -> torch.Tensor:
    """The batch's mean token loss and its gradient, computed in `chunks` length-sorted
    pieces: a piece pads to its own longest row instead of the batch's (the long answers
    would pad 32 rows to ~170 tokens). Each piece's mean is weighted by its share of the
    batch's loss tokens, so the sum is the whole batch's mean."""
    batch = sorted(batch, key=lambda ex: len(ex[0]))
    size = -(-len(batch) // chunks)
    pieces = [batch[i : i + size] for i in range(0, len(batch), size)]
    counts = [sum(sum(t != -100 for t in lab[1:]) for _, lab in p) for p in pieces]
    total = sum(counts)
    loss_sum = torch.zeros(())
    for piece, count in zip(pieces, counts, strict=True):
        loss = model(**_sft_kwargs(piece, pad_id)).loss * (count / total)
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def job_overrides(
    fx: Fixture, args: argparse.Namespace, mode: str, root: Path, rep: int = 0
) -> list[str]:
    staleness, partial = MODES[mode]
    name = mode if rep == 0 else f"{mode}_r{rep}"
    return [
        f"name=long_tail_{name}",
        f"run_dir={root / name}",
        f"seed={args.seed}",
        f"data.seed={args.seed}",  # the order prompts are handed out in
        f"model.path={fx.warm_dir}",
        f"tokenizer.path={fx.tokenizer_dir}",
        "data.task=envs.examples.long_tail:LONG_TAIL",
        "data.task_args={}",
        f"data.train_path={fx.train_path}",
        f"data.eval_path={fx.eval_path}",
        "reward.plugins=[{name: 'envs.examples.long_tail:count_reward'}]",
        f"buffer.max_staleness={staleness}",
        f"rollout.partial_rollout={str(partial).lower()}",
        f"rollout.max_new_tokens={MAX_NEW}",
        f"rollout.max_context={MAX_CONTEXT}",
        f"rollout.fold_prefill_tokens={args.fold_prefill_tokens}",
        f"rollout.max_ready_groups={args.max_ready if staleness > 0 else 0}",
        f"trainer.steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts}",
        f"rollout.prompts_per_lease={args.prompts}",
        f"rollout.n_samples_per_prompt={args.samples}",
        "rollout.eval.interval=0",
        f"rollout.eval.n_prompts={args.eval_prompts}",
        "checkpoint.interval=0",
        "checkpoint.save_hf=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        f"logging.level={'INFO' if args.verbose else 'WARNING'}",
        *args.set,
    ]


def run_mode(fx: Fixture, args: argparse.Namespace, mode: str, root: Path, rep: int = 0) -> Run:
    job = load_job(PRESET, job_overrides(fx, args, mode, root, rep))
    load0, started = os.getloadavg()[0], time.monotonic()
    with CpuSampler() as cpu:
        execute(job)
    wall = time.monotonic() - started
    run = read_run(
        mode, job.resolved_run_dir / "metrics.jsonl", args.skip, (load0, os.getloadavg()[0]), wall
    )
    first, last = run.records[0], run.records[-1]
    run.cpu = cpu.rates(first["time"] - first["perf/step_s"], last["time"])
    run.lengths = generated_lengths(job.resolved_run_dir, load_tokenizer(fx.tokenizer_dir))
    print(
        f"  {mode}: median step {run.step_s:.3f} s, {run.tokens_per_s:.0f} trained tok/s "
        f"(job wall {wall:.0f} s, load {run.load[0]:.1f} -> {run.load[1]:.1f})",
        flush=True,
    )
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="trainer steps per mode")
    parser.add_argument("--skip", type=int, default=4, help="first steps left out")
    parser.add_argument("--modes", default="sync,async1,async2,partial2")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument(
        "--model", default="toy", choices=list(MODEL_SHAPES), help="the policy's shape"
    )
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--warm", type=Path, default=None, help="reuse this SFT'd model dir")
    parser.add_argument(
        "--seed", type=int, default=0, help="the GRPO job's seed (sampling, prompt order)"
    )
    parser.add_argument(
        "--data-seed", type=int, default=0, help="rows, init and SFT: the warm start's seed"
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=1,
        help="run the modes this many times, the order reversed "
        "every other time; each async mode's ratio to the sync run of its own rep, and the median",
    )
    parser.add_argument(
        "--fold-prefill-tokens",
        type=int,
        default=0,
        help="rollout.fold_prefill_tokens of every mode (0: a prefill forward per admission)",
    )
    parser.add_argument(
        "--max-ready",
        type=int,
        default=None,
        help="rollout.max_ready_groups of the asynchronous modes (default: --prompts, one "
        "trainer batch; 0: off)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra override key=value")
    parser.add_argument("--root", type=Path, default=None, help="keep run dirs here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    args.max_ready = args.prompts if args.max_ready is None else args.max_ready
    if args.max_ready < 0:
        parser.error(f"--max-ready {args.max_ready}: at least 0")
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: at least 1")
    if args.skip >= args.steps - 1:
        parser.error(f"--skip {args.skip} leaves fewer than 2 of --steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(1)
    started = time.monotonic()
    print(
        f"long_tail: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load "
        f"{os.getloadavg()}, torch threads {torch.get_num_threads()}, modes {args.modes}, "
        f"{args.steps} steps (first {args.skip} skipped), {args.prompts} prompts x "
        f"{args.samples} samples, seed {args.seed} (data/SFT {args.data_seed}), "
        f"fold_prefill_tokens {args.fold_prefill_tokens}, async modes' max_ready_groups "
        f"{args.max_ready}, overrides {args.set}",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        if args.root is None:
            args.root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lt_")))
        fx = build_fixture(args.root, args)
        os.environ["RAY_worker_niceness"] = "0"  # as bench/async_vs_sync.py
        first = load_job(PRESET, job_overrides(fx, args, args.modes[0], args.root))
        handle = connect(first.cluster, min_cpus=2)
        try:
            reps = []
            for rep in range(args.reps):  # ABBA: each mode meets early and late load alike
                order = args.modes if rep % 2 == 0 else args.modes[::-1]
                runs = {mode: run_mode(fx, args, mode, args.root, rep) for mode in order}
                reps.append([runs[mode] for mode in args.modes])
        finally:
            handle.shutdown()
    for i, runs in enumerate(reps):
        if args.reps > 1:
            print(f"\n== rep {i + 1} of {args.reps} ==")
        print_table(runs)
    if args.reps > 1:
        print_reps(reps)
    print(f"\nwhole script {time.monotonic() - started:.0f} s, load now {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
