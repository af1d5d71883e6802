"""Sampling on the same weights: transformers' generate (as TRL's GRPOTrainer calls it) against
Physarum's embedded engine, with the e2e benchmark's settings (temperature 1, no top-k / top-p,
8 new tokens, the GLM stop tokens).

Both draw `--samples` completions for each of `--prompts` training prompts from the same warm
start, in the same order. Printed per side: mean reward (the `arithmetic` reward) with its
standard error over prompts, mean length, the fraction ended by a stop token, and the mean
log-probability the model gives its own samples (by one teacher-forced pass of the same HF
model over every side's completions, so both are judged alike). A sampler that draws from the
policy's distribution gives the same figures within noise on both sides.

    .venv/bin/python bench/e2e_sampling_parity.py --warm-start runs/bench_e2e_vs_trl/warm_start
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from common import build_fixture, load_hf_model

from envs.tasks import read_jsonl
from models.chat import prompt_ids
from models.checkpoint import from_pretrained
from models.tokenizer import load_tokenizer, stop_token_ids
from rewards.builtins.toy_tasks import arithmetic_score
from rollout.embedded.engine import EmbeddedEngine
from rollout.single_turn import generate_group
from rollout.types import SamplingParams

MAX_NEW = 8


def hf_samples(
    model: Any, tok: Any, prompts: list[list[int]], n: int, seed: int
) -> list[list[int]]:
    """n completions per prompt by generate(do_sample, temperature 1, top_k 0, top_p 1)."""
    torch.manual_seed(seed)
    stops = list(stop_token_ids(tok))
    out: list[list[int]] = []
    for p in prompts:
        ids = torch.tensor([p] * n)
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
            top_k=0, top_p=1.0, max_new_tokens=MAX_NEW, eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )[:, len(p):]  # fmt: skip
        for row in gen.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def engine_samples(warm: Path, tok: Any, prompts: list[list[int]], n: int, seed: int) -> list:
    """n completions per prompt by the embedded engine (random request seeds, as in training)."""
    engine = EmbeddedEngine(from_pretrained(warm), tokenizer=tok, context_len=64, seed=seed)
    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=-1,
                              stop_token_ids=list(stop_token_ids(tok)))  # fmt: skip
    out: list[list[int]] = []
    try:
        for p in prompts:
            episodes = asyncio.run(generate_group(engine, p, sampling, n, metadata={}))
            out += [list(e.response_ids) for e in episodes]
    finally:
        engine.shutdown()
    return out


@torch.no_grad()
def mean_logprob(model: Any, prompts: list[list[int]], samples: list[list[int]], n: int) -> float:
    """Mean over samples of the per-token logprob the HF model gives them (teacher forced)."""
    values = []
    for i, completion in enumerate(samples):
        p = prompts[i // n]
        ids = torch.tensor([p + completion])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])
        values.append(float(lp.mean()))
    return statistics.fmean(values)


def report(name: str, tok: Any, rows: list[dict], samples: list[list[int]], n: int, lp: float):
    stops = set(stop_token_ids(tok))
    rewards = [
        arithmetic_score(tok.decode(s, skip_special_tokens=True), str(rows[i // n]["label"]))
        for i, s in enumerate(samples)
    ]
    per_prompt = [statistics.fmean(rewards[k * n : (k + 1) * n]) for k in range(len(rows))]
    se = statistics.stdev(per_prompt) / math.sqrt(len(per_prompt))
    # GRPO's signal: groups of 8 whose rewards are all equal teach nothing; distinct answers
    groups = [rewards[k : k + 8] for k in range(0, len(rewards) - 7, 8)]
    flat = statistics.fmean(len(set(g)) == 1 for g in groups)
    distinct = statistics.fmean(
        len({tuple(s) for s in samples[k * n : (k + 1) * n]}) for k in range(len(rows))
    )
    print(
        f"{name:8s} reward {statistics.fmean(rewards):.4f} (s.e. over prompts {se:.4f}), "
        f"length {statistics.fmean(len(s) for s in samples):.3f}, "
        f"stopped {statistics.fmean(s[-1] in stops for s in samples):.3f}, "
        f"mean token logprob {lp:.4f}, groups of 8 with equal rewards {flat:.3f}, "
        f"distinct completions per prompt {distinct:.2f} of {n}"
    )
    return per_prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-start", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=Path("runs/bench_e2e_sampling_parity"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"e2e_sampling_parity: {datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
        f"{os.getloadavg()}, torch threads {torch.get_num_threads()}"
    )
    fixture = build_fixture(args.root / "fixture", n_train=10000, n_eval=200, seed=args.seed)
    tok = load_tokenizer(fixture.tokenizer_dir)
    rows = read_jsonl(fixture.train_path)[: args.prompts]
    prompts = [prompt_ids(tok, r["messages"]) for r in rows]
    hf = load_hf_model(args.warm_start).eval()
    n = args.samples
    a = hf_samples(hf, tok, prompts, n, args.seed)
    b = engine_samples(args.warm_start, tok, prompts, n, args.seed)
    pa = report("HF", tok, rows, a, n, mean_logprob(hf, prompts, a, n))
    pb = report("engine", tok, rows, b, n, mean_logprob(hf, prompts, b, n))
    diffs = [y - x for x, y in zip(pa, pb, strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    print(f"engine - HF reward, paired by prompt: {statistics.fmean(diffs):+.4f} (s.e. {se:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
