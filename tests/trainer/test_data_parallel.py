"""Data parallel over gloo: 2 processes on a global batch give the same update as 1 process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.trainer.ddp_worker import run
from trainer.distributed import DataParallel

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(toy_tokenizer, tmp_path):
    tok_dir = toy_tokenizer.name_or_path
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), tok_dir, str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(out)
    assert ddp["world_size"] == 2
    single_state, single_metrics = run(tok_dir, DataParallel())
    assert set(ddp["state"]) == set(single_state)
    for name, value in single_state.items():
        torch.testing.assert_close(ddp["state"][name], value, atol=2e-6, rtol=1e-5, msg=name)
    for got, want in zip(ddp["metrics"], single_metrics, strict=True):
        for key in ("loss", "pg_loss", "kl", "value_loss", "grad_norm", "entropy", "clip_frac",
                    "tokens", "moe/layer1_max_load"):  # fmt: skip
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), key
