"""`physarum run` of the toy GRPO job with `trainer.backend: megatron` (~30-90 s).

The job's trainer actor imports trainer.megatron.backend; the test-only sitecustomize in
shim_site/ installs the CPU shim in that process only. Checks: every step trained on the
megatron backend (its moe/* metrics are present), and the rollout engine, which receives
the megatron-exported weights after each step, computed the same logprobs as the trainer
(the rollout/trainer mismatch stays small).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

REPO = Path(__file__).resolve().parents[3]
STEPS = 3


@pytest.mark.slow
def test_toy_grpo_job_trains_on_the_megatron_backend(tmp_path: Path) -> None:
    site = Path(__file__).with_name("shim_site")
    env = dict(
        os.environ,
        PYTHONPATH=f"{site}:{REPO}",
        PHYSARUM_MEGATRON_CPU_SHIM="1",
        TORCHDYNAMO_DISABLE="1",
        OMP_NUM_THREADS="1",
    )
    overrides = [
        "trainer.backend=megatron",
        f"trainer.steps={STEPS}",
        "rollout.eval.n_prompts=8",
    ]
    physarum = Path(sys.executable).with_name("physarum")  # this venv's console script
    cmd = [str(physarum), "run", str(REPO / "configs/toy_grpo.yaml")]
    for item in overrides:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs/toy_grpo/metrics.jsonl").open()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all("train/moe/imbalance" in r and r["train/grad_norm"] >= 0 for r in train)
    assert all(r["train/mismatch_abs_diff"] < 0.05 for r in train)
