"""Subprocess worker of test_data_parallel.py: one rank of a gloo data-parallel PPO run.

Run by torch.distributed.run (torchrun) with 2 processes; every rank gets the same global
steps, the backend shards them, and rank 0 writes the final weights and metrics. Usage:
    torchrun --nproc_per_node 2 ddp_worker.py TOKENIZER_DIR OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.toy import backend, grpo_step, make_tokenizer, toy_model  # noqa: E402
from trainer.distributed import DataParallel  # noqa: E402

TRAINER = {"lr": 1e-3, "critic_lr": 1e-3, "micro_batch_tokens": 96}
ALGO = {"advantage": "gae", "kl": {"coef": 0.05}, "moe": {"bias_update_rate": 0.01}}
STEPS = 2


def run(tokenizer_dir: str, dp: DataParallel) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(final actor + critic tensors, per-step metrics) of the run on this process group."""
    torch.set_num_threads(1)
    tok = make_tokenizer(tokenizer_dir)
    tb = backend(toy_model(len(tok), seed=21), TRAINER, ALGO, dp=dp)
    metrics = []
    for i in range(STEPS):
        step = grpo_step(tok, n_prompts=4, n_samples=4, seed=200 + i, micro_batch_tokens=96)
        metrics.append(tb.train(step))
    state = {f"actor.{k}": v for k, v in tb.model.state_dict().items()}
    state |= {f"critic.{k}": v for k, v in tb.critic.state_dict().items()}
    return state, metrics


def main() -> None:
    dp = DataParallel.from_env("gloo")
    state, metrics = run(sys.argv[1], dp)
    if dp.rank == 0:
        torch.save({"state": state, "metrics": metrics, "world_size": dp.world_size}, sys.argv[2])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
