"""serve-engine's --device and --dtype choices (outside Ray every visible GPU counts as
given), with torch.cuda patched to stand for a GPU machine."""

from __future__ import annotations

import pytest
import torch

from models.device import DeviceError
from rollout.server.serve import serve_device, serve_dtype


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_serve_engine_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    assert serve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no GPU"):
        serve_device("cuda")
    _gpus(monkeypatch, 2)  # outside Ray every visible GPU counts as given
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert serve_device("auto") == torch.device("cuda", 0)
    assert serve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert serve_dtype("auto", torch.device("cpu")) == torch.float32
    assert serve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        serve_dtype("float16", torch.device("cpu"))
