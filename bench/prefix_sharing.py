"""The backend's GRPO step with and without shared prompt prefixes (trainer.share_prompt_prefix).

The toy e2e shape (configs/toy_grpo.yaml, bench/e2e_vs_trl.py): 8 prompts x 8 samples of the
2-digit arithmetic task, short answers. Two TorchBackends start from the SAME weights and
train on the SAME episodes, one with every group packed as a prompt tree, one unshared; the
sides alternate step by step (--reps steps each, after --warmup). Reported per side: median CPU
time (this process, 1 torch thread by default: what an idle core's wall time would be) and
wall time of `TorchBackend.train(step)` and of building the step, tokens through the model,
and the largest loss difference between the sides (the same numbers, up to fp32 rounding).
Last, the step's fixed cost: CPU time of a 1-prompt x 2-sample step (~20 model tokens).

    .venv/bin/python bench/prefix_sharing.py                 # 30 steps per side, ~1 min
    .venv/bin/python bench/prefix_sharing.py --dtype bfloat16 --reps 50
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from configs import AlgorithmConfig, TrainerConfig
from envs.tasks import tokenizer_corpus
from models import Glm4MoeForCausalLM, get_preset
from models.tokenizer import build_toy_tokenizer
from trainer.batch import build_rl_step
from trainer.torch_backend import TorchBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
from tests.trainer.toy import arithmetic_groups  # noqa: E402  (the suite's toy GRPO groups)


def _backend(model: Glm4MoeForCausalLM, dtype: str) -> TorchBackend:
    """The toy preset's trainer and algorithm settings (toy_grpo.yaml), constant lr."""
    cfg = TrainerConfig(lr=1e-4, steps=10**6, dtype=dtype)
    algo = AlgorithmConfig(
        advantage="grpo",
        loss_agg="token_mean",
        eps_clip_low=0.2,
        eps_clip_high=0.28,
        tis={"enabled": True, "low": 0.0, "high": 2.0},
        moe={"bias_update_rate": 0.0},
    )
    return TorchBackend(model, cfg, algo)


def _one_step(backend: TorchBackend, groups, share: bool) -> tuple[float, float, float, dict]:
    """(cpu s, wall s of backend.train, cpu s of building the step, metrics)."""
    c0 = time.process_time()
    step = build_rl_step(groups, micro_batch_tokens=4096, share_prompt_prefix=share)
    c1, t1 = time.process_time(), time.perf_counter()
    metrics = backend.train(step)
    return time.process_time() - c1, time.perf_counter() - t1, c1 - c0, metrics


def _fixed_cost(sides: dict[str, TorchBackend], tok, reps: int) -> None:
    """The step's cost that does not scale with tokens: backend.train on one prompt x 2
    samples (~20 model tokens), sides alternating as above."""
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(3 + reps):
        groups = arithmetic_groups(tok, n_prompts=1, n_samples=2, seed=10_000 + i)
        for name in sides if i % 2 == 0 else reversed(sides):
            seconds = _one_step(sides[name], groups, name == "shared")[0]
            if i >= 3:
                cpu[name].append(seconds)
    cells = [f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in cpu.items()]
    print(f"  fixed cost (backend.train on 1 prompt x 2 samples, cpu): {', '.join(cells)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC, load "
          f"{os.getloadavg()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"trainer.dtype {args.dtype}")  # fmt: skip
    tok = build_toy_tokenizer(tempfile.mkdtemp(prefix="tok-"), tokenizer_corpus(500))
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=len(tok)))
    sides = {"unshared": _backend(copy.deepcopy(model), args.dtype)}
    sides["shared"] = _backend(copy.deepcopy(model), args.dtype)
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
    tokens: dict[str, tuple[float, float]] = {}
    max_diff = 0.0
    for i in range(args.warmup + args.reps):
        groups = arithmetic_groups(tok, n_prompts=8, n_samples=8, seed=i)
        losses = {}
        order = ("unshared", "shared") if i % 2 == 0 else ("shared", "unshared")
        for name in order:
            cpu, wall, build, metrics = _one_step(sides[name], groups, name == "shared")
            losses[name] = metrics["loss"]
            tokens[name] = (metrics["tokens"], metrics["computed_tokens"])
            if i >= args.warmup:
                times[name].append((cpu, wall, build))
        max_diff = max(max_diff, abs(losses["shared"] - losses["unshared"]))
    print(f"GRPO step, 8 prompts x 8 samples (toy e2e shape), {args.reps} steps per side, "
          f"alternating; episode tokens/step (last) {tokens['shared'][0]:.0f}")  # fmt: skip
    med = {}
    for name, rows in times.items():
        cpu, wall, build = (statistics.median(col) for col in zip(*rows, strict=True))
        med[name] = (cpu, wall)
        print(f"  {name:8s} backend.train cpu {cpu * 1e3:7.1f} ms  wall {wall * 1e3:7.1f} ms  "
              f"build_rl_step cpu {build * 1e3:5.2f} ms  "
              f"model tokens {tokens[name][1]:.0f}")  # fmt: skip
    print(f"  shared vs unshared: {med['unshared'][0] / med['shared'][0]:.2f}x by CPU time, "
          f"{med['unshared'][1] / med['shared'][1]:.2f}x by wall time; "
          f"{tokens['unshared'][1] / tokens['shared'][1]:.2f}x fewer model tokens")  # fmt: skip
    print(f"  max |loss(shared) - loss(unshared)| over the steps: {max_diff:.2e}")
    _fixed_cost(sides, tok, args.reps)
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
