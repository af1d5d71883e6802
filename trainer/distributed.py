"""Data parallelism for the torch backend: process groups, gradient all-reduce, FSDP2 option.

Gradients are summed across ranks with one flat all-reduce per step after the micro-batches'
backward passes (the losses are already scaled by step-wide denominators, so the sum is the
exact gradient of the global batch). This is DDP's arithmetic without its forward hooks: it
works with any model method (token_logprobs, not just forward) and with MoE experts that
receive no token on some rank (their gradient counts as zero). Gloo on CPU, NCCL on GPU.
FSDP2 sharding of the actor is in trainer/fsdp.py.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclass
class DataParallel:
    """This process's place in the data-parallel group (world_size 1 = no communication)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    device: torch.device | None = None
    """Where collectives run; None = this rank's current CUDA device under NCCL (which
    reduces only GPU tensors), a tensor's own device otherwise."""

    @classmethod
    def from_env(cls, backend: str | None = None, timeout_s: float = 600.0) -> DataParallel:
        """Join (or reuse) the default process group from torchrun's env vars (RANK, ...)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
            return cls()
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), None)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def _comm_device(self) -> torch.device | None:
        if self.device is not None:
            return self.device
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return None

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> None:
        """In place; op "sum" | "max". No-op on one rank. A CPU tensor (a count, a metric)
        is reduced on the collective's device under NCCL and copied back."""
        if not self.enabled:
            return
        device = self._comm_device()
        work = tensor if device is None or tensor.device == device else tensor.to(device)
        dist.all_reduce(work, op=_OPS[op], group=self.group)
        if work is not tensor:
            tensor.copy_(work)

    def all_reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Sum gradients over ranks in one collective.

        A parameter without a gradient on this rank contributes zeros; one without a gradient
        on *every* rank keeps `grad = None` (so the optimizer skips it, as on one rank).
        """
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        device = params[0].device if params else None
        present = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float32, device=device
        )
        parts = [
            p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params
        ]
        flat = torch.cat([*(x.float() for x in parts), present])
        dist.all_reduce(flat, group=self.group)
        has_grad = flat[-len(params) :].tolist()
        offset = 0
        for p, has in zip(params, has_grad, strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone() if has else None
            offset += n

    def barrier(self) -> None:
        """Wait for every rank. No-op on one rank."""
        if self.enabled:
            dist.barrier(group=self.group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (identical starting weights)."""
        if not self.enabled:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0, group=self.group)
