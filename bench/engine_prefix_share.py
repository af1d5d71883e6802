"""The embedded engine's shared prompt prefill on the e2e GRPO shape, in one run.

A rollout worker's lease in bench/e2e_vs_trl.py is 8 prompts x 8 samples, each sample its
own n=1 request (rollout/single_turn.py), prompts of ~19 tokens, 8 new tokens, T=1. The
scheduler prefills each distinct prompt once and copies its K/V into the other slots
(`share_key` of rollout/embedded/prompt_share.py); the peer is the same engine with one key
per request (every request prefilled on its own row, which was the behaviour before). Both
sides run the same requests, alternated --reps times; the figure is the best generation time
per lease (CPU clock of this process by default, so other jobs' load does not deschedule
either side).

    .venv/bin/python bench/engine_prefix_share.py [--reps 5] [--threads 1] [--clock cpu]
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
import rollout.embedded.prompt_share as prompt_share  # noqa: E402
import rollout.embedded.scheduler as scheduler  # noqa: E402
from models import Glm4MoeForCausalLM, get_preset  # noqa: E402
from rollout.embedded import EmbeddedEngine  # noqa: E402
from rollout.types import GenerateRequest, SamplingParams  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SHARED_KEY = prompt_share.share_key


def set_share_key(key) -> None:
    """The key used by admission (scheduler) and by prefill pairing (prompt_share)."""
    scheduler.share_key = prompt_share.share_key = key


def per_request_key(seq) -> tuple | None:
    """The peer: a fresh sequence shares only with the samples of its own request."""
    return None if seq.output_ids else (seq.group,)


def lease(prompts: int, samples: int, prompt_len: int, vocab: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(prompts):
        ids = torch.randint(1, vocab, (prompt_len,), generator=g).tolist()
        for j in range(samples):
            seed_ij = 1000 * i + j
            params = SamplingParams(8, temperature=1.0, ignore_eos=True, sampling_seed=seed_ij)
            out.append(GenerateRequest(ids, params, rid=f"p{i}-s{j}"))
    return out


async def one_lease(engine: EmbeddedEngine, requests: list, samples: int) -> list:
    """Each prompt's samples in one generate call, the prompts concurrently (as a worker)."""
    calls = [engine.generate(requests[i : i + samples]) for i in range(0, len(requests), samples)]
    return [o for outs in await asyncio.gather(*calls) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="cpu", choices=sorted(CLOCKS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=19)
    args = ap.parse_args()
    if min(args.reps, args.threads, args.prompts, args.samples, args.prompt_len) < 1:
        raise SystemExit("--reps, --threads, --prompts, --samples, --prompt-len: expected >= 1")
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", initializer_range=0.2))
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    batch = args.prompts * args.samples
    engine = EmbeddedEngine(
        model, max_running=batch, context_len=args.prompt_len + 8, eos_token_ids=[], seed=0
    )
    requests = lease(args.prompts, args.samples, args.prompt_len, model.config.vocab_size, 1)
    times: dict[str, list[float]] = {"shared": [], "per-request": []}
    rows: dict[str, int] = {}
    outputs: dict[str, list] = {}
    try:
        asyncio.run(one_lease(engine, requests, args.samples))  # warm-up
        for _ in range(args.reps):
            for name, key in (("shared", SHARED_KEY), ("per-request", per_request_key)):
                set_share_key(key)
                before = engine.stats()["num_prefill_rows"]
                start = clock()
                outputs[name] = asyncio.run(one_lease(engine, requests, args.samples))
                times[name].append(clock() - start)
                rows[name] = engine.stats()["num_prefill_rows"] - before
    finally:
        set_share_key(SHARED_KEY)
        engine.shutdown()
    same = sum(
        a.output_ids == b.output_ids
        for a, b in zip(outputs["shared"], outputs["per-request"], strict=True)
    )
    dlp = max(
        abs(x - y)
        for a, b in zip(outputs["shared"], outputs["per-request"], strict=True)
        for x, y in zip(a.logprobs, b.logprobs)
    )
    print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load}, torch threads {torch.get_num_threads()}, {args.clock} clock")
    print(
        f"lease: {args.prompts} prompts x {args.samples} n=1 requests, prompt {args.prompt_len} "
        f"tokens, 8 new tokens, T=1, glm4moe-toy; best of {args.reps}, alternated"
    )
    for name in times:
        print(
            f"  {name:12s}: {min(times[name]) * 1e3:7.1f} ms per lease "
            f"(prefill rows per lease: {rows[name]})"
        )
    ratio = min(times["per-request"]) / min(times["shared"])
    print(f"  speed-up    : {ratio:7.2f}x")
    print(f"  same tokens : {same}/{batch} samples; max |dlogprob| {dlp:.1e}")


if __name__ == "__main__":
    main()
