"""Where one trainer step of the e2e job goes: phases by CPU time and a torch.profiler table.

The step of `bench/e2e_vs_trl.py` (configs/toy_grpo.yaml with the bench's overrides: GRPO,
ppo_clip, token_mean, no KL, prompt sharing on) on the glm4moe-toy model (the e2e warm start
when --model is given, else a seeded init), 8 prompts x 8 samples of the arithmetic task
(tests/trainer/toy.py), fp32, 1 torch thread. The phases are the backend's own calls, run one
after another on the same step, timed by this thread's CPU clock (the machine is shared):

    build      trainer/batch.build_rl_step from the groups (the service's perf/cpu_build_s)
    prepare    advantages (no logprob pass in this config: PassPlan)
    forward    trainable_logprobs (trunk + chunked lm_head at the trainable tokens)
    loss       the ActorObjective on that forward
    backward   loss.backward()
    optimizer  clip + AdamW + scheduler
    export     TorchBackend.weight_update() (what the service hands the rollout at s1)

then the whole `backend.train(step)` for comparison, and a torch.profiler table of one step.

    .venv/bin/python bench/trainer_step_profile.py [--model runs/bench_e2e_vs_trl/warm_start]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
from trainer_step_before_after import OVERRIDES  # noqa: E402  (the e2e job's trainer overrides)

from configs import load_job  # noqa: E402
from models.checkpoint import from_pretrained  # noqa: E402
from tests.trainer.toy import arithmetic_groups, make_tokenizer, toy_model  # noqa: E402
from trainer.batch import build_rl_step  # noqa: E402
from trainer.forward import trainable_logprobs  # noqa: E402
from trainer.torch_backend import TorchBackend  # noqa: E402


def e2e_step_fixture(model_dir, tokenizer_dir, dtype: str) -> tuple:
    """(backend, groups, build kwargs) of the e2e job's trainer step: its config, the model
    (an HF dir, else a seeded glm4moe-toy) and 8 groups x 8 samples of the arithmetic task."""
    job = load_job("configs/toy_grpo.yaml", [*OVERRIDES, f"trainer.dtype={dtype}"])
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(tokenizer_dir or tmp)
        model = from_pretrained(model_dir) if model_dir else toy_model(len(tok))
        groups = arithmetic_groups(tok, 8, 8, seed=0)
    backend = TorchBackend(model, job.trainer, job.algorithm, total_steps=10**6)
    return backend, groups, step_kwargs(job)


def step_kwargs(job) -> dict:
    return dict(
        micro_batch_tokens=job.trainer.micro_batch_tokens,
        temperature=job.rollout.temperature or 1.0,
        share_prompt_prefix=job.trainer.share_prompt_prefix,
    )


def phases(backend: TorchBackend, groups, kwargs: dict) -> dict[str, float]:
    """CPU seconds of each phase of one step, the backend's calls in the order train() runs."""
    out: dict[str, float] = {}
    clock = time.thread_time
    t = clock()
    step = build_rl_step(groups, current_version=backend.version, **kwargs)
    out["build"] = clock() - t
    t = clock()
    batches = backend.prepare(step)
    out["prepare"] = clock() - t
    backend.model.train()
    backend.optimizer.zero_grad(set_to_none=True)
    totals = backend._totals(batches, backend.objective.count)
    fwd = loss_s = bwd = 0.0
    for b in batches:
        t = clock()
        res = trainable_logprobs(backend.model, b, chunk_size=backend.cfg.logprob_chunk)
        fwd += clock() - t
        t = clock()
        loss, _ = backend.objective(b, res.logprobs, totals, entropy=res.entropy,
                                    aux_loss=res.aux_loss)  # fmt: skip
        loss_s += clock() - t
        t = clock()
        loss.backward()
        bwd += clock() - t
    out["forward"], out["loss"], out["backward"] = fwd, loss_s, bwd
    t = clock()
    backend._optimizer_step(backend.model, backend.optimizer, backend.scheduler)
    out["optimizer"] = clock() - t
    backend.version += 1
    t = clock()
    backend.weight_update()
    out["export"] = clock() - t
    t = clock()
    backend.train(build_rl_step(groups, current_version=backend.version, **kwargs))
    out["train() whole"] = clock() - t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="an HF dir (the e2e warm start)")
    p.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer dir")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="trainer.dtype"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC, load "
          f"{os.getloadavg()}, torch threads {torch.get_num_threads()}")  # fmt: skip
    backend, groups, kwargs = e2e_step_fixture(args.model, args.tokenizer, args.dtype)
    step = build_rl_step(groups, **kwargs)
    tokens = sum(b.num_tokens for b in step.micro_batches)
    print(f"step: {len(groups)} groups x {len(groups[0].episodes)}, {tokens} model tokens, "
          f"{len(step.micro_batches)} micro-batch(es)")  # fmt: skip
    runs = [phases(backend, groups, kwargs) for _ in range(args.reps + 3)][3:]
    print(f"CPU ms per phase, median of {args.reps} steps:")
    for name in runs[0]:
        print(f"  {name:14s} {statistics.median(r[name] for r in runs) * 1e3:7.2f}")
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            backend.train(build_rl_step(groups, current_version=backend.version, **kwargs))
    events = prof.key_averages()
    print("torch.profiler, 5 steps of backend.train (self CPU, all ops):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40))


if __name__ == "__main__":
    main()
