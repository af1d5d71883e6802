"""Subprocess worker of test_checkpoint.py: run PPO steps of the toy set-up, optionally from a
checkpoint, and write the final weights. Usage:
    python resume_worker.py TOKENIZER_DIR FIRST_STEP NUM_STEPS OUT.pt [--load CKPT] [--save CKPT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.toy import backend, grpo_step, make_tokenizer, toy_model  # noqa: E402

TRAINER = {"lr": 1e-3, "critic_lr": 2e-3, "lr_schedule": "cosine", "warmup_steps": 2, "steps": 6,
           "min_lr": 1e-4, "weight_decay": 0.01}  # fmt: skip
ALGO = {"advantage": "gae", "lam": 0.9, "kl": {"coef": 0.05}, "entropy_coef": 0.01,
        "moe": {"bias_update_rate": 0.01}}  # fmt: skip


def run(tokenizer_dir: str, first: int, count: int, load: str | None, save: str | None):
    """The backend after steps first .. first + count - 1 (each step's data seeded by its index)."""
    torch.set_num_threads(1)
    tok = make_tokenizer(tokenizer_dir)
    tb = backend(toy_model(len(tok), seed=11), TRAINER, ALGO, seed=3)
    if load:
        tb.load(load)
    for i in range(first, first + count):
        tb.train(grpo_step(tok, n_prompts=4, n_samples=4, seed=100 + i))
    if save:
        tb.save(save)
    return tb


def weights(tb) -> dict[str, torch.Tensor]:
    """Actor and critic tensors, plus the router biases, by name."""
    out = {f"actor.{k}": v.clone() for k, v in tb.model.state_dict().items()}
    out |= {f"critic.{k}": v.clone() for k, v in tb.critic.state_dict().items()}
    out["version"] = torch.tensor(tb.version)
    out["lr"] = torch.tensor(tb.scheduler.get_last_lr()[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("out")
    parser.add_argument("--load")
    parser.add_argument("--save")
    args = parser.parse_args()
    tb = run(args.tokenizer_dir, args.first, args.count, args.load, args.save)
    torch.save(weights(tb), args.out)


if __name__ == "__main__":
    main()
