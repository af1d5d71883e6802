"""Subprocess worker of test_data_parallel.py: one rank of a gloo data-parallel run.

Run by torch.distributed.run (torchrun) with exactly 2 processes. As in the trainer service,
every rank trains on its own share of each step's episode groups (rank r takes groups r,
r+2, ...); `run` with a one-rank DataParallel trains on both shares. Scenarios:
  ppo      GAE with a critic (replicated, gradients all-reduced) and a KL loss to a reference
  rpp      REINFORCE++ (whitening over the global batch) with the KL in the reward
  fsdp     GRPO with the actor sharded by FSDP2 (one step: its sharded grad-norm sums differ in
           the last bits, and a second step can flip a near-tie MoE routing choice), plus a
           save/load round trip and weight export
  fsdp_shared  fsdp with each group's samples packed as one prompt tree
           (trainer.share_prompt_prefix): the same numbers as fsdp, fewer computed tokens
Rank 0 writes {scenario: {"state": full tensors, "metrics": [...]}}. Usage:
    torchrun --nproc_per_node 2 ddp_worker.py TOKENIZER_DIR OUT.pt
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.toy import arithmetic_groups, backend, make_tokenizer, toy_model  # noqa: E402
from trainer.batch import build_rl_step, concat_steps  # noqa: E402
from trainer.distributed import DataParallel  # noqa: E402
from trainer.fsdp import full_state  # noqa: E402

SCENARIOS = {
    "ppo": ({"lr": 1e-3, "critic_lr": 1e-3},
            {"advantage": "gae", "kl": {"coef": 0.05}, "moe": {"bias_update_rate": 0.01}}),
    "rpp": ({"lr": 1e-3},
            {"advantage": "reinforce_pp", "kl": {"coef": 0.05, "mode": "reward"}}),
    "fsdp": ({"lr": 1e-3, "fsdp": True}, {"advantage": "grpo", "entropy_coef": 0.01}),
}  # fmt: skip
SCENARIOS["fsdp_shared"] = SCENARIOS["fsdp"]
SHARED = {"fsdp_shared"}  # scenarios whose steps pack prompt trees
STEPS = {"ppo": 2, "rpp": 2, "fsdp": 1, "fsdp_shared": 1}


def _state(tb) -> dict[str, torch.Tensor]:
    if tb._fsdp_units:
        state = full_state(tb.model, tb.optimizer)["model"]
    else:
        state = {k: v.clone() for k, v in tb.model.state_dict().items()}
    out = {f"actor.{k}": v for k, v in state.items()}
    if tb.critic is not None:
        out |= {f"critic.{k}": v.clone() for k, v in tb.critic.state_dict().items()}
    return out


def _step(tok, i: int, dp: DataParallel, share: bool = False):
    """This rank's share of step i; on one rank, both shares' micro-batches (packed the same
    way, so that the comparison sees only the order of the gradient sums)."""
    groups = arithmetic_groups(tok, n_prompts=4, n_samples=4, seed=200 + i)
    shares = [
        build_rl_step(groups[r::2], micro_batch_tokens=96, share_prompt_prefix=share)
        for r in range(2)
    ]
    return shares[dp.rank] if dp.enabled else concat_steps(shares)


def run(tokenizer_dir: str, scenario: str, dp: DataParallel) -> dict:
    """{"state": actor (+ critic) tensors after STEPS[scenario] steps, "metrics": per step}."""
    torch.set_num_threads(1)
    tok = make_tokenizer(tokenizer_dir)
    trainer, algo = SCENARIOS[scenario]
    tb = backend(toy_model(len(tok), seed=21), trainer | {"micro_batch_tokens": 96}, algo, dp=dp)
    share = scenario in SHARED
    metrics = [tb.train(_step(tok, i, dp, share)) for i in range(STEPS[scenario])]
    return {"state": _state(tb), "metrics": metrics, "backend": tb}


def fsdp_round_trip(tokenizer_dir: str, dp: DataParallel, directory: str) -> dict:
    """Save after one FSDP step, take a second step, reload, take it again: both results."""
    tok = make_tokenizer(tokenizer_dir)
    trainer, algo = SCENARIOS["fsdp"]
    tb = backend(toy_model(len(tok), seed=22), trainer | {"micro_batch_tokens": 96}, algo, dp=dp)
    tb.train(_step(tok, 0, dp))
    tb.save(directory)
    tb.train(_step(tok, 1, dp))
    first = _state(tb)
    exported = dict(tb.export_weights())
    tb.load(directory)
    tb.train(_step(tok, 1, dp))
    return {"first": first, "second": _state(tb), "exported": exported}


def main() -> None:
    dp = DataParallel.from_env("gloo")
    out = {}
    for scenario in SCENARIOS:
        result = run(sys.argv[1], scenario, dp)
        result.pop("backend")
        out[scenario] = result
    with tempfile.TemporaryDirectory() as directory:
        shared = dp.all_gather_object(directory)[0]  # rank 0's directory for every rank
        out["fsdp_round_trip"] = fsdp_round_trip(sys.argv[1], dp, shared)
    if dp.rank == 0:
        torch.save(out | {"world_size": dp.world_size}, sys.argv[2])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
