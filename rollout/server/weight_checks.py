"""Check a weight update before any of it is loaded, so a bad one leaves the old weights intact.

The loader (`models.hf_io.load_hf_tensors`) copies tensor by tensor: a bad tensor found half
way would leave the model half updated, and a NaN or an int64 tensor it accepts breaks the next
/generate. So every tensor is checked first, against the model it would go into:

* the name is one the model has (or one the loader skips on purpose: layers past the model's,
  a tied lm_head, an MTP layer's copy of the embedding);
* the dtype is a float the loader reads (float32, bfloat16, float16, float64; float8_e4m3fn
  weights with their float `weight_scale_inv`);
* a dense tensor has its slot's shape;
* every value is finite.

`WeightCheckError` (a ValueError) names the first bad tensor; the routes answer it with 400.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from models.fp8 import FP8_DTYPE
from models.hf_io import _lookup, hf_slots  # _lookup: the loader's own name rules, reused

SCALE_SUFFIX = "_scale_inv"
DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class WeightCheckError(ValueError):
    """A weight update refused before loading; the message names the tensor and the fault."""


def check_named_tensors(
    model: nn.Module, named: Iterable[tuple[str, torch.Tensor]], *, require_all: bool = False
) -> int:
    """Check every (HF name, tensor) against `model` (see module doc); returns how many.

    require_all: every tensor of the model must be present (a whole checkpoint from disk).
    """
    slots = hf_slots(model)
    config = getattr(model, "config", None)
    num_layers = int(getattr(config, "num_hidden_layers", 0))
    total = num_layers + len(getattr(model, "mtp", ()))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    seen: set[str] = set()
    count = 0
    for name, value in named:
        _check_one(name, value, slots, num_layers, total, tied)
        seen.add(name.removesuffix(SCALE_SUFFIX) if name.endswith(SCALE_SUFFIX) else name)
        count += 1
    if count == 0:
        raise WeightCheckError("weight update: no tensors")
    if require_all:
        missing = [n for n in slots if n not in seen]
        if missing:
            raise WeightCheckError(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    return count


def _check_one(
    name: str, value: object, slots: dict, num_layers: int, total: int, tied: bool
) -> None:
    if not isinstance(name, str) or not name:
        raise WeightCheckError(f"tensor name {name!r}: expected a non-empty string")
    if not isinstance(value, torch.Tensor):
        raise WeightCheckError(f"tensor {name!r}: expected a tensor, got {type(value).__name__}")
    is_scale = name.endswith(SCALE_SUFFIX)
    base = name[: -len(SCALE_SUFFIX)] if is_scale else name
    try:
        slot = _lookup(slots, base, num_layers, total, tied)
    except ValueError as exc:
        raise WeightCheckError(str(exc)) from None
    allowed = DENSE_DTYPES if is_scale else (*DENSE_DTYPES, FP8_DTYPE)
    if value.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise WeightCheckError(
            f"tensor {name!r}: dtype {str(value.dtype).removeprefix('torch.')} is not one of "
            f"{names}"
        )
    dense = not is_scale and value.dtype != FP8_DTYPE
    if slot is not None and dense and tuple(value.shape) != tuple(slot.shape):
        raise WeightCheckError(
            f"tensor {name!r}: expected shape {list(slot.shape)}, got {list(value.shape)}"
        )
    finite = torch.isfinite(value.float() if value.dtype == FP8_DTYPE else value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise WeightCheckError(f"tensor {name!r}: {bad} non-finite value(s) (NaN or inf)")
