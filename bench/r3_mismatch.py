"""Train-inference mismatch with FP8 rollout: R3 (the engine's experts replayed) against R2
(the trainer's own routing in its logprob pass), on the toy GRPO job.

The toy job's inputs are prepared as `physarum run` does (tokenizer, arithmetic rows, a fresh
glm4moe-toy model, or --model DIR for a trained HF checkpoint). The embedded engine with
`rollout.fp8` (blockwise e4m3 weights) samples the job's rollouts and records its experts
from position 0; the torch backend (unquantized weights, as in the job) then computes the
logprobs of the same tokens three ways (each seed: its own init, rows and samples):

  R2 / none         the trainer routes every token itself (what R2's logprob pass does)
  R3                the engine's experts for the response, the trainer's for the prompt
  R3 + prompt       the engine's experts for every token (replay_prompt_routing)

and reports over the trainable tokens: mean |Δlogprob|, the k3 KL(rollout || trainer), the
largest |Δ|, the fraction with |Δ| > 0.05, and how often the trainer's own router picks other
experts than the engine did (per token and MoE layer). R3's remaining mismatch is the FP8
numerics alone; R2's adds the routing flips that the FP8 weights cause.

    .venv/bin/python bench/r3_mismatch.py [--prompts 64] [--samples 8] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import torch

from buffer.episode import EpisodeGroup
from configs import load_job
from models import RoutingCapture
from models.chat import prompt_ids
from models.checkpoint import from_pretrained
from models.tokenizer import load_tokenizer
from physarum.prepare import prepare
from physarum.rundir import RunDir
from rollout.embedded import EmbeddedEngine
from rollout.single_turn import generate_group, row_metadata
from rollout.types import SamplingParams
from trainer.batch import build_rl_step
from trainer.losses.importance import mismatch_k3
from trainer.torch_backend import TorchBackend

MODES = {
    "R2 / none": {"routing_replay": "trainer"},
    "R3": {"routing_replay": "rollout"},
    "R3 + prompt": {"routing_replay": "rollout", "replay_prompt_routing": True},
}


def rollouts(job, model_dir: Path, tokenizer, rows, samples: int, seed: int) -> list:
    model = from_pretrained(model_dir, dtype=torch.float32)
    engine = EmbeddedEngine(model, tokenizer=tokenizer, fp8=True, seed=seed, context_len=128)
    sampling = SamplingParams(
        max_new_tokens=job.rollout.max_new_tokens, temperature=job.rollout.temperature,
        sampling_seed=seed,
    )  # fmt: skip
    groups = []
    try:
        for i, row in enumerate(rows):
            ids = prompt_ids(tokenizer, row["messages"])
            episodes = asyncio.run(
                generate_group(engine, ids, sampling, samples, metadata=row_metadata(row),
                               routed_experts_from=0)
            )  # fmt: skip
            groups.append(EpisodeGroup(f"p{i}", episodes))
    finally:
        engine.shutdown()
    return groups


def measure(job, model_dir: Path, groups, moe: dict) -> dict[str, float]:
    algo = job.algorithm.model_copy(update={"moe": job.algorithm.moe.model_copy(update=moe)})
    model = from_pretrained(model_dir, dtype=torch.float32)
    backend = TorchBackend(model, job.trainer, algo)
    replay = moe["routing_replay"] == "rollout"
    prompt = moe.get("replay_prompt_routing", False)
    step = build_rl_step(
        groups, micro_batch_tokens=4096, rollout_routing=replay, prompt_routing=prompt
    )
    every = build_rl_step(
        groups, micro_batch_tokens=4096, rollout_routing=True, prompt_routing=True
    )
    engine_rows = [b.routed_experts for b in every.micro_batches]
    diffs, k3s, flips, rows = [], [], 0, 0
    for b, lp, engine in zip(step.micro_batches, backend.logprobs(step.micro_batches), engine_rows):
        mask = b.loss_mask > 0
        diffs.append((lp - b.rollout_logprobs)[mask].abs())
        k3s.append(mismatch_k3(lp, b.rollout_logprobs)[mask])
        own = RoutingCapture()
        with torch.no_grad():
            model.forward_packed(b.input_ids, b.cu_seqlens, routing=own)
        known = (engine >= 0).all(-1)
        flips += int(((own.routed_experts != engine).any(-1) & known).sum())
        rows += int(known.sum())
    d, k3 = torch.cat(diffs), torch.cat(k3s)
    return {
        "mean_abs": float(d.mean()),
        "k3": float(k3.mean()),
        "max_abs": float(d.max()),
        "frac_gt_0.05": float((d > 0.05).float().mean()),
        "tokens": int(d.numel()),
        "own_router_differs": flips / max(rows, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", type=Path, default=None, help="HF dir (default: fresh init)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            run = Path(tmp) / f"seed{seed}"
            overrides = [f"run_dir={run}", f"seed={seed}", f"model.init_seed={seed}",
                         f"data.seed={seed}"]  # fmt: skip
            job = load_job(Path("configs/toy_grpo.yaml"), overrides)
            if args.model is not None:
                job = job.model_copy(update={"model": job.model.model_copy(
                    update={"path": str(args.model)})})  # fmt: skip
            prepared = prepare(job, RunDir(run).create())
            tokenizer = load_tokenizer(prepared.tokenizer_dir)
            lines = prepared.train_path.read_text().splitlines()[: args.prompts]
            rows = [json.loads(line) for line in lines]
            groups = rollouts(job, prepared.model_dir, tokenizer, rows, args.samples, seed)
            for name, moe in MODES.items():
                results[name].append(measure(job, prepared.model_dir, groups, moe))
                print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}; FP8 rollout (embedded engine), fp32 trainer")
    print(
        "| routing | mean abs dlogprob | k3 KL | max abs | frac abs > 0.05 | own router differs |"
    )
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        print(
            f"| {name} | {mean['mean_abs']:.2e} | {mean['k3']:.2e} | {mean['max_abs']:.3f} | "
            f"{mean['frac_gt_0.05']:.4f} | {mean['own_router_differs']:.4f} |"
        )
    print(f"({len(args.seeds)} seeds x {args.prompts} prompts x {args.samples} samples; "
          f"{results['R3'][0]['tokens']} trainable tokens per seed)")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
