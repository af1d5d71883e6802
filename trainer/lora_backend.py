"""LoRA in the torch backend: adapters on the frozen actor, the adapter-free reference, and the
adapter-only weight update. `TorchBackend` calls these few hooks; the math is models/lora.py.

- Training: the base is frozen (no grad, no optimizer state); only `LoraAdapters` train.
- Reference policy: the same model with the adapters disabled (no second copy in memory).
- Weight sync: the adapters (+ scaling, + version) in float32, never the base; the receiver
  merges them onto the base it keeps (models/lora_merge.py). An engine that cannot merge
  (SGLang) gets `merged_weight_update` instead: the targeted weights only, `W + s B A` in
  the model's dtype. The rest of the base never changes, so the engine's copy of it, loaded
  from the same checkpoint, stays right without being resent.
- MoE balance: the router's loss-free bias is part of the frozen base and is not nudged (the
  rollout engines only ever receive adapters, so routing stays the same on both sides).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from configs.services import TrainerConfig
from models.lora import LoraAdapters, attach_lora
from models.weight_update import WeightUpdate, build_weight_update
from trainer.distributed import DataParallel


def setup_lora(model: nn.Module, cfg: TrainerConfig, dp: DataParallel) -> LoraAdapters | None:
    """Freeze `model` and attach cfg.lora's adapters (the same on every rank); None = full FT."""
    if cfg.lora is None:
        return None
    lora = attach_lora(model, cfg.lora)
    dp.broadcast_module(lora)  # A is random: every rank starts from rank 0's
    return lora


class AdapterFreeReference:
    """The KL reference under LoRA: the actor's own forward with every adapter disabled."""

    def __init__(self, model: nn.Module, lora: LoraAdapters) -> None:
        self.model, self.lora = model, lora

    def token_logprobs(self, *args: Any, **kwargs: Any) -> Any:
        with self.lora.disabled():
            return self.model.token_logprobs(*args, **kwargs)


def adapter_weight_update(
    lora: LoraAdapters,
    version: int,
    *,
    bucket_bytes: int,
    device: torch.device | str = "cpu",
) -> WeightUpdate:
    """The adapters as a versioned update: float32 tensors + `lora.scaling`, nothing else."""
    return build_weight_update(
        lora.sync_tensors(),
        version,
        bucket_bytes=bucket_bytes,
        fp8_block=None,  # the receiver re-quantizes the merged weight for an FP8 engine
        dtype=torch.float32,
        device=device,
    )


def merged_weight_update(
    model: nn.Module,
    lora: LoraAdapters,
    version: int,
    *,
    bucket_bytes: int,
    fp8_block: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> WeightUpdate:
    """The adapter-targeted weights merged (`W + s B A`), nothing else: a full-weight update
    for an engine without adapter merging; every other weight is the frozen base."""
    deltas = lora.deltas()
    named = (
        (name, (tensor.detach().float() + deltas[name]).to(tensor.dtype))
        for name, tensor in model.hf_state_dict()
        if name in deltas
    )
    return build_weight_update(
        named,
        version,
        bucket_bytes=bucket_bytes,
        fp8_block=fp8_block,
        dtype=dtype or model.dtype,
        device=device,
    )


def adapter_bytes(lora: LoraAdapters) -> int:
    """Bytes of the adapters' tensors in float32 (what an update must carry, unpadded)."""
    return sum(t.numel() * 4 for _, t in lora.sync_tensors())


def merged_state(model: nn.Module, lora: LoraAdapters) -> list[tuple[str, Tensor]]:
    """HF-named full weights with the adapters merged (`W + s B A`), for hf/ export."""
    deltas = lora.deltas()
    out = []
    for name, tensor in model.hf_state_dict():
        delta = deltas.get(name)
        out.append((name, tensor if delta is None else (tensor.float() + delta).to(tensor.dtype)))
    return out
