"""bench/gpu_check.py on the CPU with tiny sizes: the one table has every row, each with a
positive measured figure (or, for transformers' FP8 row, n/a with the reason), and the
shell wrapper refuses a GPU run clearly where torch has no CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    ("decode bf16", "tok/s"),
    ("decode fp8 (e4m3, 128x128 blocks)", "tok/s"),
    ("GRPO train step bf16", "tok/s"),
    ("GRPO train step bf16", "s/step"),
    ("weight sync bf16, in process (payload on the device)", "s"),
    ("weight sync bf16, host bytes (cross-process path)", "s"),
    ("weight sync fp8 -> FP8 engine, in process", "s"),
]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_cpu_tiny_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        rc = gpu_check.main(["--device", "cpu", "--size", "tiny", "--no-install", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "device: CPU" in out
    lines = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = lines[0], lines[1:]
    assert header.startswith("| measurement | unit | Physarum | HF transformers |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    assert [(c[0], c[1]) for c in cells] == ROWS
    for name, unit, ours, hf, _ratio, detail in cells:
        assert _number(ours) > 0, (name, unit, ours)
        if name == "decode bf16":  # transformers runs bf16 on any device
            assert _number(hf) > 0
            assert "greedy tokens equal to HF's" in detail
        elif name.startswith("decode fp8"):  # n/a only with transformers' reason
            assert _number(hf) > 0 if hf != "n/a" else "(HF: " in detail
        else:
            assert hf == "-"
        if name.startswith("weight sync"):
            assert re.search(r"\d+\.\d MiB in \d+ bucket", detail)


def test_rows_carry_bytes_of_each_sync() -> None:
    rows = gpu_check.run("cpu", "tiny")
    syncs = [r for r in rows if r.name.startswith("weight sync")]
    assert len(syncs) == 3
    assert all(r.ours and r.ours > 0 and r.extra["bytes"] > 0 for r in syncs)
    bf16, _, fp8 = syncs
    assert fp8.extra["bytes"] < bf16.extra["bytes"]  # FP8 linear weights: half the bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_shell_wrapper_refuses_cuda_without_gpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--device", "cuda", "--no-install"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sees no GPU" in proc.stderr
    assert "--device cpu" in proc.stderr
