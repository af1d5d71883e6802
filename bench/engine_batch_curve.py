"""What a decode step of the embedded engine costs against its batch: the long tail's price.

In a long-tail rollout the last few long responses decode alone: a step of 1-4 rows pays
most of what a full step costs (weights read, one Python/ctypes pass per layer, sampling),
for a few tokens. This measures that price on this machine, per step and per token, at
batch 1-64, for the `glm4moe-toy` model (what `long_tail.py` runs) and the `small-36M`
MoE of `decode_bound.py` (weights larger than this CPU's L3). A step's time is the
difference between requests of 65 and 1 new tokens over 64 (the prefill cancels out), best
of --reps, on this process's CPU clock (the engine thread is its only busy thread).

The peer is the engine itself at batch 64: the last column is the cost of a token at each
batch as a multiple of a token at batch 64.

    .venv/bin/python bench/engine_batch_curve.py [--dtype float32 bfloat16] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from decode_bound import SMALL_36M, VOCAB  # noqa: E402

from models.config import get_preset  # noqa: E402
from models.glm4moe import Glm4MoeForCausalLM  # noqa: E402
from rollout.embedded import EmbeddedEngine  # noqa: E402
from rollout.types import GenerateRequest, SamplingParams  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)
STEPS = 64  # decode steps timed per request (65 new tokens against 1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = {
    "toy": lambda: get_preset("glm4moe-toy", initializer_range=0.2),
    "small-36M": lambda: get_preset("glm4moe-toy", vocab_size=VOCAB, **SMALL_36M),
}


def generate_cpu_s(engine: EmbeddedEngine, batch: int, new_tokens: int) -> float:
    """CPU seconds of this process for `batch` 4-token prompts, `new_tokens` each, T=1."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    requests = [GenerateRequest([5 + i % 50, 7, 9, 11], params) for i in range(batch)]
    start = time.process_time()
    asyncio.run(engine.generate(requests))
    return time.process_time() - start


def step_ms(engine: EmbeddedEngine, batch: int, reps: int) -> float:
    """Best CPU ms of one decode step at `batch` rows (the prefill cancels out)."""
    runs = []
    for _ in range(reps):
        long = generate_cpu_s(engine, batch, STEPS + 1)
        runs.append(long - generate_cpu_s(engine, batch, 1))
    return min(runs) / STEPS * 1e3


def curve(name: str, dtype: torch.dtype, reps: int) -> None:
    model = Glm4MoeForCausalLM(MODELS[name]())
    model.to_dtype(dtype)
    params = sum(p.numel() for p in model.parameters())
    engine = EmbeddedEngine(model, max_running=max(BATCHES), context_len=80, eos_token_ids=[])
    generate_cpu_s(engine, 4, 4)  # warm-up: kernels built, caches allocated
    steps = {b: step_ms(engine, b, reps) for b in BATCHES}
    full = steps[BATCHES[-1]] / BATCHES[-1]
    print(f"\n{name} ({params / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')})")
    print(f"{'batch':>6} {'ms/step':>9} {'ms/token':>9} {'x batch-64 token':>17}")
    for b, ms in steps.items():
        print(f"{b:>6} {ms:9.2f} {ms / b:9.3f} {ms / b / full:17.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"engine_batch_curve: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load "
        f"average {', '.join(f'{x:.2f}' for x in os.getloadavg())}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU clock, best of {args.reps}"
    )
    for dtype in args.dtype:
        for name in args.models:
            curve(name, DTYPES[dtype], args.reps)
    print(f"\nload average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
