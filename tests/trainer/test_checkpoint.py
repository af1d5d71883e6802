"""Checkpoint and resume: N steps straight == N/2 steps, save, load in a FRESH PROCESS, N/2 more."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.resume_worker import run, weights

WORKER = Path(__file__).with_name("resume_worker.py")


def test_resume_in_a_fresh_process_matches_the_straight_run(toy_tokenizer, tmp_path):
    tok_dir = toy_tokenizer.name_or_path
    straight = weights(run(tok_dir, 0, 4, None, None))
    run(tok_dir, 0, 2, None, str(tmp_path / "ckpt"))
    out = tmp_path / "resumed.pt"
    ckpt = str(tmp_path / "ckpt")
    cmd = [sys.executable, str(WORKER), tok_dir, "2", "2", str(out), "--load", ckpt]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(out)
    assert set(resumed) == set(straight)
    assert int(resumed["version"]) == 4
    assert float(resumed["lr"]) == pytest.approx(float(straight["lr"]))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5, msg=name)
    # the run really moved: the resumed weights differ from the checkpointed ones
    half = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=False)
    moved = [k for k, v in half["model"].items() if not torch.equal(v, resumed[f"actor.{k}"])]
    assert moved


def test_loading_into_a_different_trainer_names_what_is_missing(toy_tokenizer, tmp_path):
    from tests.trainer.toy import backend, toy_model

    grpo = backend(toy_model(len(toy_tokenizer)), {}, {"advantage": "grpo"})
    grpo.save(str(tmp_path / "grpo"))
    ppo = backend(toy_model(len(toy_tokenizer)), {}, {"advantage": "gae"})
    with pytest.raises(ValueError, match="critic"):
        ppo.load(str(tmp_path / "grpo"))
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        ppo.load(str(tmp_path / "nowhere"))
