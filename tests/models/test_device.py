"""models.device: cluster.device selection (auto | cpu | cuda) and the dist backend, on a CPU
with torch.cuda.is_available / device_count patched to stand for a GPU process."""

from __future__ import annotations

import pytest
import torch

from models.device import DeviceError, dist_backend, has_assigned_gpu, resolve_device


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Make torch believe it sees `n` CUDA devices (0 = none)."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_cpu_is_always_cpu(gpus) -> None:
    gpus(2)
    assert resolve_device("cpu", gpu_ids=[0], env={"CUDA_VISIBLE_DEVICES": "0"}) == torch.device(
        "cpu"
    )


def test_auto_without_assigned_gpu_is_cpu(gpus) -> None:
    gpus(1)  # the machine has a GPU, but Ray gave this actor none
    assert resolve_device("auto", gpu_ids=[], env={}) == torch.device("cpu")
    assert resolve_device("auto", env={"CUDA_VISIBLE_DEVICES": ""}) == torch.device("cpu")
    assert resolve_device("auto", env={"CUDA_VISIBLE_DEVICES": "-1"}) == torch.device("cpu")


def test_auto_with_ray_gpu_ids_is_local_cuda0(gpus) -> None:
    gpus(1)  # Ray set CUDA_VISIBLE_DEVICES=3, so the actor sees one device: cuda:0
    assert resolve_device("auto", gpu_ids=[3], env={"CUDA_VISIBLE_DEVICES": "3"}) == torch.device(
        "cuda", 0
    )
    assert resolve_device("auto", gpu_ids=["3"], env={}) == torch.device("cuda", 0)


def test_auto_with_visible_devices_env(gpus) -> None:
    gpus(2)
    assert resolve_device("auto", env={"CUDA_VISIBLE_DEVICES": "4,5"}) == torch.device("cuda", 0)
    assert resolve_device("auto", env={"CUDA_VISIBLE_DEVICES": "4,5"}, local_index=1) == (
        torch.device("cuda", 1)
    )


def test_auto_with_assigned_gpu_but_no_cuda_is_cpu(gpus) -> None:
    gpus(0)  # e.g. a CPU-only torch build in an actor that Ray gave a GPU
    assert resolve_device("auto", gpu_ids=[0], env={"CUDA_VISIBLE_DEVICES": "0"}) == (
        torch.device("cpu")
    )


def test_cuda_without_gpu_names_the_field(gpus) -> None:
    gpus(0)
    with pytest.raises(DeviceError, match=r"cluster\.device=cuda.*no GPU"):
        resolve_device("cuda", env={})


def test_cuda_with_gpu(gpus) -> None:
    gpus(1)
    assert resolve_device("cuda", env={}) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="index 1"):
        resolve_device("cuda", env={}, local_index=1)


def test_bad_setting(gpus) -> None:
    gpus(0)
    with pytest.raises(DeviceError, match=r"cluster\.device: expected one of auto, cpu, cuda"):
        resolve_device("gpu")


def test_reads_os_environ_by_default(gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert has_assigned_gpu()
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert not has_assigned_gpu()
    assert resolve_device("auto") == torch.device("cpu")


def test_dist_backend() -> None:
    assert dist_backend("cpu") == "gloo"
    assert dist_backend(torch.device("cpu")) == "gloo"
    assert dist_backend("cuda:0") == "nccl"
    assert dist_backend(torch.device("cuda", 1)) == "nccl"
