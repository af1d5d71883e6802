"""cluster.device reaches the trainer: the field's values, and a trainer asked for CUDA on a
machine without a GPU fails at once, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import load_job
from models.device import DeviceError


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_cluster_device_field() -> None:
    job = load_job(Path("configs/toy_grpo.yaml"))
    assert job.cluster.device == "auto"
    assert load_job(Path("configs/toy_grpo.yaml"), ["cluster.device=cpu"]).cluster.device == "cpu"
    with pytest.raises(Exception, match="cluster.device"):
        load_job(Path("configs/toy_grpo.yaml"), ["cluster.device=gpu"])


def test_trainer_with_cuda_setting_and_no_gpu_fails_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from trainer.service import TrainerService

    _gpus(monkeypatch, 0)
    job = load_job(Path("configs/toy_grpo.yaml"), ["cluster.device=cuda"])
    with pytest.raises(DeviceError, match=r"cluster\.device=cuda"):
        TrainerService(job, tmp_path, store=None, total_steps=1)
