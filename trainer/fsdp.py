"""FSDP2 (`fully_shard`) for the actor: parameters, gradients and optimizer state sharded
across the data-parallel ranks (trainer.fsdp: true). The critic and the reference stay
replicated (the critic's gradients are all-reduced like the non-FSDP actor's).

The whole actor is ONE FSDP unit (`token_logprobs` registered as its forward method):
parameters, gradients and AdamW state are sharded at rest and gathered for the step's
forward/backward. Per-layer units are not possible yet: the model's DecoderLayer.forward_packed
collects MoE outputs by appending to a list argument, and FSDP2 rebuilds any argument
structure that holds grad-requiring tensors (RegisterPostBackwardFunction), so the appends of
all but the first MoE layer would be lost. FSDP2 *averages* gradients over ranks and gloo
has no PREMUL_SUM to make that a sum, so the backend multiplies the actor's loss by the world
size (its losses are already normalised by step-wide denominators). Checkpoints hold full
(unsharded) state dicts, written by rank 0, in the same layout as the non-FSDP backend's
model entry; the optimizer entry is keyed by parameter name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

_OPTIONS_KW = {"full_state_dict": True, "cpu_offload": True}


def shard_actor(model: nn.Module) -> list[nn.Module]:
    """fully_shard the model as one unit (see the module docstring); returns the units."""
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError as err:  # pragma: no cover - depends on the torch build
        raise RuntimeError(f"trainer.fsdp: FSDP2 (fully_shard) is unavailable: {err}") from err
    fully_shard(model, reshard_after_forward=False)
    register_fsdp_forward_method(model, "token_logprobs")
    return [model]


@contextlib.contextmanager
def unsharded(units: list[nn.Module]) -> Iterator[None]:
    """All-gather every unit's parameters for the duration (collective on every rank)."""
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def to_float(norm: Tensor) -> float:
    """A (possibly DTensor) scalar as a float (the full value on every rank)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} full state dicts on rank 0 (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(**_OPTIONS_KW)
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load full state dicts (as `full_state` wrote them) into the sharded model/optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
