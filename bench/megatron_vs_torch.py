"""Training step time of the megatron backend vs the torch backend on the toy GLM-4 MoE.

Same initial weights (glm4moe-toy, seeded), same packed micro-batches, same objective (GRPO's
PPO-clip with TIS and an entropy bonus), fp32, one thread per process; `--warmup` steps, then
`--steps` timed optimizer steps (median and min reported). The two shimmed runs alternate
step by step, so both see the same machine load, and the per-round ratio is reported too:

  torch              TorchBackend.train_step, before the megatron CPU shim is installed
  torch + shim       the same after `tests.trainer.megatron.cpu_shim.install()`: the shim's
                     TorchFunctionMode adds Python work to every torch op, so this is the fair
                     peer of the megatron run on this CPU
  megatron           MegatronBackend.train_step (GPTModel, megatron DDP + Adam, the schedule)

The CPU shim is test-only code (megatron calls CUDA unconditionally); this bench borrows it,
production code never does. Under torchrun (--nproc_per_node 2) the megatron run uses the
given --tp/--pp/--ep and the torch run is data parallel over the same ranks.

    .venv/bin/python bench/megatron_vs_torch.py [--steps 10] [--micro-batches 4]
    .venv/bin/torchrun --nproc_per_node 2 bench/megatron_vs_torch.py --ep 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from configs.algorithm import AlgorithmConfig, TISConfig  # noqa: E402
from configs.services import MegatronConfig, TrainerConfig  # noqa: E402
from models import Glm4MoeForCausalLM, get_preset  # noqa: E402
from trainer.backend import PackedBatch  # noqa: E402


def make_batches(vocab: int, micro_batches: int, seqs: int, length: int) -> list[PackedBatch]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(micro_batches):
        total = seqs * length
        ids = torch.randint(0, vocab, (total,), generator=gen)
        seq_ids = torch.arange(seqs).repeat_interleave(length)
        mask = ((torch.arange(total) % length) >= length // 2).float()
        out.append(
            PackedBatch(
                input_ids=ids,
                cu_seqlens=torch.arange(seqs + 1) * length,
                loss_mask=mask,
                rollout_logprobs=-torch.rand(total, generator=gen) * 5 * mask,
                advantages=torch.randn(seqs, generator=gen)[seq_ids] * mask,
                versions=torch.zeros(total, dtype=torch.long),
                seq_ids=seq_ids,
                old_logprobs=-torch.rand(total, generator=gen) * 5 * mask,
            )
        )
    return out


def timed(step, batches) -> float:
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    step(batches)
    return time.perf_counter() - start


def time_steps(step, batches, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step(batches)
    return [timed(step, batches) for _ in range(steps)]


def time_alternating(runs: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """runs: name -> (step function, batches); one step of each per round."""
    for step, batches in runs.values():
        for _ in range(warmup):
            step(batches)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, (step, batches) in runs.items():
            times[name].append(timed(step, batches))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from trainer.distributed import DataParallel
    from trainer.torch_backend import TorchBackend

    dp = DataParallel.from_env()
    config = get_preset("glm4moe-toy")
    model = Glm4MoeForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    hf = {k: v.clone() for k, v in model.hf_state_dict()}
    batches = make_batches(config.vocab_size, args.micro_batches, args.seqs, args.length)
    algo = AlgorithmConfig(tis=TISConfig(enabled=True), entropy_coef=0.01)
    trainer = TrainerConfig(lr=1e-4, megatron=MegatronConfig(tp=args.tp, pp=args.pp, ep=args.ep))
    torch_backend = TorchBackend(model, trainer, algo, dp=dp)
    mine = [b for i, b in enumerate(batches) if i % dp.world_size == dp.rank]
    results = {"torch": time_steps(torch_backend.train_step, mine, args.warmup, args.steps)}

    from tests.trainer.megatron import cpu_shim  # test-only: see the module docstring

    cpu_shim.install()
    from trainer.megatron.backend import MegatronBackend
    from trainer.megatron.model import ensure_process_group

    ensure_process_group()
    megatron = MegatronBackend(config, hf, trainer, algo)
    runs = {
        "torch + shim": (torch_backend.train_step, mine),
        "megatron": (megatron.train_step, batches),
    }
    results |= time_alternating(runs, args.warmup, args.steps)
    if dp.rank == 0:
        tokens = sum(b.num_tokens for b in batches)
        print(
            f"glm4moe-toy fp32, {dp.world_size} process(es), tp {args.tp} pp {args.pp} "
            f"ep {args.ep}; {args.micro_batches} micro-batches x {args.seqs} x {args.length} "
            f"= {tokens} tokens per step"
        )
        for name, times in results.items():
            median = statistics.median(times)
            print(
                f"{name:>13}: median {median * 1e3:7.1f} ms  min {min(times) * 1e3:7.1f} ms  "
                f"{tokens / median:8.0f} tok/s"
            )
        ratios = [m / t for m, t in zip(results["megatron"], results["torch + shim"])]
        print(
            f"megatron / (torch + shim), per round: median x{statistics.median(ratios):.2f} "
            f"(min x{min(ratios):.2f}, max x{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
