"""Applying an adapter-only weight update (models.lora sync tensors) to a full model.

The receiving model (an embedded engine's, plain or FP8) keeps, per targeted weight, a
float32 copy of its base, and every update writes `base + s * B A` computed afresh from that
copy: no drift however many updates arrive. The copy is taken the first time an adapter update
touches a weight, or, for an FP8 engine, by `keep_exact_base` before the model is quantized
(rollout/worker.py): the merged weight is then quantized once, exactly as quantizing the
trainer's `W + s B A` would (a dequantized FP8 base would round sub-step deltas away).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from configs.services import LoraConfig
from models.fp8 import dequantize_blockwise
from models.hf_io import hf_slots
from models.lora import adapter_deltas, target_weight_names

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


@torch.no_grad()
def keep_exact_base(model: nn.Module, cfg: LoraConfig) -> int:
    """Keep a float32 copy of every weight cfg's adapters target, before the model is quantized
    (an FP8 engine): merges then quantize the exact `W + s B A` once, instead of adding the
    delta to the dequantized FP8 base, where deltas below half an FP8 step round away.
    Returns the number of weights kept."""
    base: dict[str, Tensor] = model.__dict__.setdefault(_BASE_ATTR, {})
    slots = hf_slots(model)
    for name in target_weight_names(model, cfg):
        base[name] = _current(slots[name]).clone()
    return len(base)
