"""Data parallel over gloo: 2 ranks, each on its share of a step, give the same update as one
process on the whole step (replicated DP for PPO and REINFORCE++, FSDP2 for GRPO)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.ddp_worker import SCENARIOS, run
from trainer.distributed import DataParallel

WORKER = Path(__file__).with_name("ddp_worker.py")
KEYS = ("loss", "pg_loss", "grad_norm", "entropy", "clip_frac", "tokens", "moe/layer1_max_load")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(toy_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), toy_tokenizer.name_or_path, str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    return result


def test_two_gloo_ranks_match_one_process(two_ranks, toy_tokenizer):
    for scenario in SCENARIOS:
        single = run(toy_tokenizer.name_or_path, scenario, DataParallel())
        ddp = two_ranks[scenario]
        assert set(ddp["state"]) == set(single["state"]), scenario
        for name, value in single["state"].items():
            torch.testing.assert_close(
                ddp["state"][name], value, atol=5e-6, rtol=1e-5, msg=f"{scenario}: {name}"
            )
        extra = {"ppo": ("kl", "value_loss"), "rpp": ("kl", "advantages")}.get(scenario, ())
        for got, want in zip(ddp["metrics"], single["metrics"], strict=True):
            for key in KEYS + extra:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (scenario, key)
            assert got["tokens"] == want["tokens"] > 0
    # prompt trees under FSDP: the unshared run's numbers, with fewer tokens computed. The
    # states get a looser bound: Adam's first step moves a weight by ~lr * g / (|g| + eps), so
    # a gradient near eps that differs in its last bits moves it by a visible part of lr (1e-3)
    plain, shared = two_ranks["fsdp"], two_ranks["fsdp_shared"]
    for got, want in zip(shared["metrics"], plain["metrics"], strict=True):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), ("shared", key)
        assert got["tokens"] == want["tokens"]
        assert got["computed_tokens"] < want["computed_tokens"]
    for name, value in plain["state"].items():
        torch.testing.assert_close(shared["state"][name], value, atol=1e-4, rtol=0, msg=name)
    round_trip = two_ranks["fsdp_round_trip"]
    for name, value in round_trip["first"].items():
        torch.testing.assert_close(round_trip["second"][name], value, msg=name)
    embed = round_trip["first"]["actor.model.embed_tokens.weight"]
    torch.testing.assert_close(round_trip["exported"]["model.embed_tokens.weight"], embed)
