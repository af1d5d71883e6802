"""What a component of the model costs inside the e2e trainer step: ablate it, alternate.

The step is `bench/trainer_step_profile.py`'s (the e2e job's `backend.train` on 8 prompts x 8
samples, prompt sharing on, fp32, 1 torch thread; glibc keeps freed memory as the trainer
actor does). Each named ablation replaces one component by a near-free stand-in, and the
step runs with and without it, alternating step by step in one process (thread CPU clock:
the machine is shared, and a component's cost inside the step, cache-cold and next to the
matmuls, is not its cost in a micro-benchmark). The numbers it trains are wrong under an
ablation; only the timing means anything.

    rmsnorm    RMSNorm.forward -> x * weight (the 17 norms of the step: 9 hidden, 8 q/k)
    rope       Rope.apply -> identity
    attention  the SDPA core -> q (k and v then get no gradient: their projections'
               backward goes too)

    .venv/bin/python bench/trainer_step_ablation.py --model /tmp/s1/e2e/warm_start \
        --tokenizer /tmp/s1/e2e/warm_start --ablate rmsnorm rope attention --pairs 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
from trainer_step_profile import e2e_step_fixture  # noqa: E402

from models import attention, layers  # noqa: E402
from trainer.batch import build_rl_step  # noqa: E402
from trainer.host_memory import retain_freed_memory  # noqa: E402


def _sdpa_stand_in(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return q * 1.0


# name -> (object, attribute, stand-in)
ABLATIONS: dict[str, tuple[object, str, Callable]] = {
    "rmsnorm": (layers.RMSNorm, "forward", lambda self, x: x * self.weight),
    "rope": (layers.Rope, "apply", lambda self, x: x),
    "attention": (attention.F, "scaled_dot_product_attention", _sdpa_stand_in),
}


@contextlib.contextmanager
def ablated(name: str) -> Iterator[None]:
    owner, attr, stand_in = ABLATIONS[name]
    original = getattr(owner, attr)
    setattr(owner, attr, stand_in)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def alternate(step: Callable[[], None], name: str, pairs: int) -> tuple[list, list]:
    """Thread CPU seconds of `pairs` whole steps with and without the ablation, alternated
    (the order flips every pair)."""
    full, cut = [], []
    for i in range(pairs):
        for ablate in (i % 2 == 0, i % 2 == 1):
            ctx = ablated(name) if ablate else contextlib.nullcontext()
            with ctx:
                t = time.thread_time()
                step()
                (cut if ablate else full).append(time.thread_time() - t)
    return full, cut


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="an HF dir (the e2e warm start)")
    p.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer dir")
    p.add_argument("--ablate", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--pairs", type=int, default=40, help="alternated step pairs per ablation")
    args = p.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    backend, groups, kwargs = e2e_step_fixture(args.model, args.tokenizer, "float32")

    def step() -> None:
        backend.train(build_rl_step(groups, current_version=backend.version, **kwargs))

    for _ in range(4):
        step()
    print(f"load {os.getloadavg()[0]:.1f}; thread CPU ms per step, {args.pairs} pairs each")
    print(f"{'ablation':10s} {'full':>7s} {'ablated':>8s} {'cost':>6s}  median paired cost")
    for name in args.ablate:
        full, cut = alternate(step, name, args.pairs)
        a, b = statistics.median(full) * 1e3, statistics.median(cut) * 1e3
        paired = statistics.median(f - c for f, c in zip(full, cut)) * 1e3
        print(f"{name:10s} {a:7.2f} {b:8.2f} {a - b:6.2f}  {paired:6.2f}")
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
