"""Applying an adapter-only weight update (models.lora sync tensors) to a full model.

The receiving model (an embedded engine's, plain or FP8) keeps, per targeted weight, a
float32 copy of its base taken the first time an adapter update touches it, and every update
writes `base + s * B A` computed afresh from that copy: no drift however many updates arrive.
An FP8 layer gets the merged weight re-quantized blockwise (the frozen base alone is never
what the FP8 engine runs once adapters exist).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from models.fp8 import dequantize_blockwise
from models.hf_io import hf_slots
from models.lora import adapter_deltas

_BASE_ATTR = "_lora_base"  # {HF weight name: float32 base} kept on the receiving model


def _current(slot: object) -> Tensor:
    """The slot's weight now, float32 (an FP8 pair is dequantized)."""
    if hasattr(slot, "w8"):
        return dequantize_blockwise(slot.w8, slot.scale, slot.block, torch.float32)
    return slot.tensor.detach().float()


@torch.no_grad()
def apply_adapter_update(model: nn.Module, named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Merge the adapters of one update into `model`; returns the weight names written."""
    deltas = adapter_deltas(list(named))
    base: dict[str, Tensor] = model.__dict__.setdefault(_BASE_ATTR, {})
    missing = [n for n in deltas if n not in base]
    if missing:
        slots = hf_slots(model)
        unknown = [n for n in missing if n not in slots]
        if unknown:
            raise ValueError(f"LoRA update: no weight {unknown[0]!r} in the receiving model")
        for name in missing:
            base[name] = _current(slots[name]).clone()
    merged = ((name, base[name] + delta.to(base[name].device)) for name, delta in deltas.items())
    return model.load_hf_state_dict(merged, strict=False)
