"""Loading HF-named weights into a running embedded engine, between two decode steps.

Used by the HTTP server's `/update_weights_from_tensor` (SGLang's tensor payload) and
`/update_weights_from_disk`. Sequences in flight continue with the new weights; an optional
version becomes the version of every token generated afterwards. (Our own trainer -> rollout
message goes through `EmbeddedEngine.update_weights(WeightUpdate)`.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.autograd.graph import increment_version

from models.checkpoint import iter_checkpoint_tensors

if TYPE_CHECKING:
    from rollout.embedded.engine import EmbeddedEngine


def mark_weights_changed(model: torch.nn.Module, tensors: list[torch.Tensor] | None = None) -> None:
    """Bump the version counter of every parameter and buffer after an in-place weight load.

    The model rebuilds its fused decode weights when a tensor's version changes
    (models/decode.py); a load that writes through `.data` does not bump it, so the engine
    does it explicitly (O(number of tensors), no data touched). `tensors`: the model's
    parameters and buffers listed once by the caller (walking the module tree is most of
    the cost: ~0.6 ms of the toy model's ~3 ms load per update).
    """
    for t in (*model.parameters(), *model.buffers()) if tensors is None else tensors:
        increment_version(t)


def load_in_place(
    model: torch.nn.Module,
    load: Callable[[], object],
    tensors: list[torch.Tensor] | None = None,
) -> None:
    """Run `load` (it writes the model's parameters and buffers in place) and mark them
    changed, even when `load` fails part way: the next forward then copies what was written
    into the model's decode weights (Glm4MoeForCausalLM.decode_weights: DecodeWeights.refresh),
    once however many updates came in between."""
    try:
        load()
    finally:
        mark_weights_changed(model, tensors)


async def load_named_tensors(
    engine: EmbeddedEngine,
    named: list[tuple[str, torch.Tensor]],
    version: int | None = None,
    *,
    fp8_block: tuple[int, int] | None = None,
) -> None:
    """Load HF-named tensors (any subset; FP8 pairs allowed) and optionally set the version."""

    def load() -> None:
        model = engine.model
        load_in_place(
            model, lambda: model.load_hf_state_dict(named, strict=False, fp8_block=fp8_block)
        )
        if version is not None:
            engine.sched.version = int(version)

    await engine.run_between_steps(load)


async def load_checkpoint(
    engine: EmbeddedEngine,
    path: str | Path,
    version: int | None = None,
    *,
    fp8_block: tuple[int, int] | None = None,
) -> None:
    """Load every tensor of an HF checkpoint directory (strict) and optionally set the version."""

    def load() -> None:
        tensors = iter_checkpoint_tensors(path)
        model = engine.model
        load_in_place(
            model, lambda: model.load_hf_state_dict(tensors, strict=True, fp8_block=fp8_block)
        )
        if version is not None:
            engine.sched.version = int(version)

    await engine.run_between_steps(load)
