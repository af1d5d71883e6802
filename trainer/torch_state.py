"""What leaves the torch backend's process: weight updates for the rollout, and checkpoints.

Functions of a `TorchBackend` (trainer/torch_backend.py keeps the training; this module the
state it exports and restores). Under FSDP the export all-gathers the shards, so every rank
must call these; under LoRA the update carries the adapters (or the merged targeted weights
for an engine that cannot merge them) and checkpoints save the adapters only.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from models.weight_update import WeightUpdate, build_weight_update
from trainer.checkpoint import load_state, save_state
from trainer.fsdp import full_state, load_full_state, unsharded
from trainer.lora_backend import adapter_weight_update, merged_weight_update

if TYPE_CHECKING:
    from trainer.torch_backend import TorchBackend


class HfViews:
    """The model's (HF name, tensor view) list, built once and reused while the model's
    parameters and buffers are the same tensors at the same addresses (the optimizer and
    `load` write into them in place). Rebuilding it walks every module and slices ~100
    per-expert views: about half the export's CPU time for the toy model, every step."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._views: list[tuple[str, Tensor]] = []

    def get(self, model: nn.Module) -> list[tuple[str, Tensor]]:
        tensors = chain(model.parameters(), model.buffers())
        key = tuple((id(t), t.data_ptr(), t.shape) for t in tensors)
        if key != self._key:
            self._views = [(name, t.detach()) for name, t in model.hf_state_dict()]
            self._key = key
        return self._views

    @property
    def key(self) -> tuple | None:
        """What the last `get` checked: the same key, the same views."""
        return self._key


def export_weights(
    model: nn.Module, fsdp_units: Any, views: HfViews | None = None
) -> Iterator[tuple[str, Tensor]]:
    """The actor's full tensors with Hugging Face on-disk names (detached, on the model's
    device: nothing is copied to the CPU here). Under FSDP every rank must call this (the
    parameters are all-gathered). views: a cache of the unsharded model's views."""
    if fsdp_units:
        with unsharded(fsdp_units):
            tensors = [(n, t.detach().clone()) for n, t in model.hf_state_dict()]
        yield from tensors
        return
    if views is not None:
        yield from views.get(model)
        return
    for name, tensor in model.hf_state_dict():
        yield name, tensor.detach()


def weight_update(
    backend: TorchBackend,
    version: int,
    *,
    fp8_block: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    lora_merged: bool = False,
) -> WeightUpdate:
    """The actor's weights as a versioned, bucketed update (cfg.weight_bucket_mb buckets);
    fp8_block quantises the linear weights blockwise (on the model's device); dtype
    defaults to the model's.

    device is where the bucket payloads live. The default, the CPU, is for an update that
    leaves this process (a Ray object, an HTTP body: those carry host bytes, and a CUDA
    tensor in a Ray object would need a GPU on the receiving side). An engine in this
    same process on the same GPU takes `device=backend.device` and nothing leaves the GPU.
    lora_merged: under LoRA, send the targeted weights merged instead of the adapters
    (an engine that cannot merge them, SGLang).
    """
    bucket_bytes = backend.cfg.weight_bucket_mb * 2**20
    if backend.lora is not None and lora_merged:
        return merged_weight_update(
            backend.model, backend.lora, version, bucket_bytes=bucket_bytes,
            fp8_block=fp8_block, dtype=dtype, device=device,
        )  # fmt: skip
    if backend.lora is not None:  # adapters only; FP8 and dtype apply on the receiving side
        return adapter_weight_update(
            backend.lora, version, bucket_bytes=bucket_bytes, device=device
        )
    target = dtype or backend.model.dtype
    if backend._fsdp_units is None and fp8_block is None:  # the plain export: layout kept
        views = backend._hf_views.get(backend.model)
        return backend._export_plan.build(
            backend._hf_views.key, views, version, bucket_bytes=bucket_bytes, dtype=target,
            device=torch.device(device),
        )  # fmt: skip
    return build_weight_update(
        backend.export_weights(),
        version,
        bucket_bytes=bucket_bytes,
        fp8_block=fp8_block,
        dtype=target,
        device=device,
    )


def _stateful(backend: TorchBackend) -> dict[str, Any]:
    items: dict[str, Any] = {
        "model": backend._trainable,  # LoRA: the adapters only, the base is never re-saved
        "optimizer": backend.optimizer,
        "scheduler": backend.scheduler,
    }
    if backend.ref is not None:
        items["ref"] = backend.ref
    if backend.critic is not None:
        items |= {
            "critic": backend.critic,
            "critic_optimizer": backend.critic_optimizer,
            "critic_scheduler": backend.critic_scheduler,
        }
    return items


def save(backend: TorchBackend, path: str) -> None:
    """Model, optimizer, scheduler (+ critic, reference), RNG, version into directory path.
    Every rank must call it (rank 0 writes the state, each rank its RNG state)."""
    items = _stateful(backend)
    fsdp = backend._fsdp_units
    state = full_state(backend.model, backend.optimizer) if fsdp else {}
    state |= {name: obj.state_dict() for name, obj in items.items() if name not in state}
    state["version"] = backend.version
    save_state(path, state, rank=backend.dp.rank)
    if backend.dp.enabled:
        torch.distributed.barrier()


def load(backend: TorchBackend, path: str) -> None:
    """Restore everything `save` wrote; the components must match (same algorithm)."""
    state = load_state(path, rank=backend.dp.rank)
    items = _stateful(backend)
    missing = sorted(set(items) - set(state))
    if missing:
        raise ValueError(f"checkpoint {path}: lacks {missing} that this trainer needs")
    fsdp = backend._fsdp_units
    if fsdp:
        load_full_state(backend.model, backend.optimizer, state)
    for name, obj in items.items():
        if not (fsdp and name in ("model", "optimizer")):
            obj.load_state_dict(state[name])
    backend.version = int(state["version"])
