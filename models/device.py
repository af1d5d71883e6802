"""Which torch device a process computes on (`cluster.device: auto | cpu | cuda`).

`resolve_device(setting)` turns the config value into a `torch.device`:

- `cpu`: always the CPU.
- `cuda`: `cuda:<local index>`; an error naming `cluster.device` when this process has no GPU.
- `auto`: `cuda:<local index>` when this process was given GPUs (Ray's `get_gpu_ids()`
  non-empty, or `CUDA_VISIBLE_DEVICES` set to something) and torch sees CUDA; else the CPU.

Ray sets `CUDA_VISIBLE_DEVICES` of an actor to the GPUs it was given, so its first GPU is
`cuda:0` inside the actor whatever its global id; the local index is therefore always 0 here
(one GPU per process). Ray is never imported by this module: callers that run inside a Ray
actor pass `ray.get_gpu_ids()` as `gpu_ids`.

`dist_backend(device)` is the torch.distributed backend for tensors on that device: NCCL for
CUDA, gloo otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

DeviceSetting = Literal["auto", "cpu", "cuda"]
SETTINGS: tuple[str, ...] = ("auto", "cpu", "cuda")
FIELD = "cluster.device"


class DeviceError(RuntimeError):
    """The configured device cannot be used by this process."""


def _visible_devices(env: Mapping[str, str]) -> list[str]:
    """The entries of CUDA_VISIBLE_DEVICES ([] when unset, empty or '-1'/'NoDevFiles')."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return []
    items = [s.strip() for s in raw.split(",") if s.strip()]
    if not items or items[0] in ("-1", "NoDevFiles"):
        return []
    return items


def has_assigned_gpu(
    gpu_ids: Sequence[object] | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """True when this process was given a GPU: Ray's gpu ids, or CUDA_VISIBLE_DEVICES."""
    if gpu_ids:
        return True
    return bool(_visible_devices(os.environ if env is None else env))


def resolve_device(
    setting: str,
    *,
    gpu_ids: Sequence[object] | None = None,
    env: Mapping[str, str] | None = None,
    local_index: int = 0,
) -> torch.device:
    """The device for `cluster.device = setting` in this process.

    gpu_ids: `ray.get_gpu_ids()` when called inside a Ray actor (None elsewhere).
    env: the environment to read CUDA_VISIBLE_DEVICES from (os.environ by default).
    local_index: which of the visible GPUs (0: the first one Ray gave this actor).
    """
    if setting not in SETTINGS:
        raise DeviceError(f"{FIELD}: expected one of {', '.join(SETTINGS)}, got {setting!r}")
    if local_index < 0:
        raise DeviceError(f"{FIELD}: local GPU index must be >= 0, got {local_index}")
    if setting == "cpu":
        return torch.device("cpu")
    env = os.environ if env is None else env
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if setting == "auto":
        if not has_assigned_gpu(gpu_ids, env) or not available or count == 0:
            return torch.device("cpu")
        if local_index >= count:
            raise DeviceError(
                f"{FIELD}=auto: GPU index {local_index} asked for, but this process sees "
                f"{count} GPU(s) (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        return torch.device("cuda", local_index)
    # setting == "cuda"
    if not available or count == 0:
        why = (
            "this torch build has no CUDA"
            if torch.version.cuda is None
            else "torch.cuda.is_available() is False"
        )
        raise DeviceError(
            f"{FIELD}=cuda but this process has no GPU ({why}; "
            f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}, Ray gpu ids="
            f"{list(gpu_ids) if gpu_ids is not None else None}). Give the role GPUs "
            f"(cluster.trainer_gpus / cluster.rollout_gpus) or set {FIELD} to auto or cpu."
        )
    if local_index >= count:
        raise DeviceError(
            f"{FIELD}=cuda: GPU index {local_index} asked for, but this process sees {count} GPU(s)"
        )
    return torch.device("cuda", local_index)


def dist_backend(device: str | torch.device) -> Literal["nccl", "gloo"]:
    """torch.distributed backend for tensors on `device`: nccl on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """bf16 for CUDA autocast, None (no autocast) on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None
