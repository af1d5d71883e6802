"""Hugging Face on-disk tensor names <-> the model's tensors, both directions, plain and FP8.

Module paths in Physarum's model are HF's in-memory names, so most tensors map one to one.
Routed experts are fused in memory ([E, 2I, H] gate+up, [E, H, I] down) and split on disk
into `mlp.experts.{j}.{gate,up,down}_proj.weight`. MTP layer i (module `mtp.{i}`, its
decoder at `mtp.{i}.decoder`) is `model.layers.{num_hidden_layers + i}` on disk. A block-FP8
tensor is a pair `<x>.weight` (float8_e4m3fn) + `<x>.weight_scale_inv` (fp32); pairs may
arrive in any order and are dequantized when the target is a plain layer, while dense weights
sent to an FP8 layer are quantized with its block size.
"""

from __future__ import annotations

import difflib
import logging
import re
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from models.fp8 import (
    DEFAULT_BLOCK,
    FP8_DTYPE,
    Fp8ExpertBank,
    Fp8Linear,
    dequantize_blockwise,
    quantize_blockwise,
)
from models.moe import ExpertBank

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP_MODULE = re.compile(r"^mtp\.(\d+)(\.decoder)?(?=\.|$)")
_MTP_COPY = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$")


class _ParamSlot:
    """A parameter or buffer stored as is."""

    def __init__(self, name: str, tensor: Tensor) -> None:
        self.name, self.tensor = name, tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def items(self) -> list[tuple[str, Tensor]]:
        return [(self.name, self.tensor.detach())]

    # set_*: called by load_hf_tensors, under its torch.no_grad (a context per tensor cost
    # ~10 % of a load); an in-place copy bumps the version counter (the decode cache key)
    def set_dense(self, value: Tensor) -> None:
        _check_shape(self.name, self.shape, value)
        self.tensor.copy_(value)

    def set_fp8(self, w8: Tensor, scale: Tensor, block: tuple[int, int]) -> None:
        _check_shape(self.name, self.shape, w8)
        self.tensor.copy_(dequantize_blockwise(w8, scale, block, torch.float32))


class _BankSlot(_ParamSlot):
    """One expert's projection inside a fused plain ExpertBank."""

    def __init__(self, name: str, bank: ExpertBank, expert: int, proj: str) -> None:
        i = bank.intermediate
        views = {
            "gate_proj": bank.gate_up_proj.detach()[expert, :i],
            "up_proj": bank.gate_up_proj.detach()[expert, i:],
            "down_proj": bank.down_proj.detach()[expert],
        }
        super().__init__(name, views[proj])


class _Fp8Slot:
    """An FP8 weight + scale pair: an Fp8Linear or one projection of an Fp8ExpertBank."""

    def __init__(self, name: str, w8: Tensor, scale: Tensor, block: tuple[int, int]) -> None:
        self.name, self.w8, self.scale, self.block = name, w8, scale, block

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w8.shape)

    def items(self) -> list[tuple[str, Tensor]]:
        return [(self.name, self.w8), (self.name + SCALE_SUFFIX, self.scale)]

    def set_dense(self, value: Tensor) -> None:
        _check_shape(self.name, self.shape, value)
        w8, scale = quantize_blockwise(value, self.block)
        self.w8.copy_(w8)
        self.scale.copy_(scale)

    def set_fp8(self, w8: Tensor, scale: Tensor, block: tuple[int, int]) -> None:
        _check_shape(self.name, self.shape, w8)
        if tuple(block) != tuple(self.block):
            self.set_dense(dequantize_blockwise(w8, scale, block, torch.float32))
            return
        _check_shape(self.name + SCALE_SUFFIX, tuple(self.scale.shape), scale)
        self.w8.copy_(w8)
        self.scale.copy_(scale)


def _check_shape(name: str, expected: tuple[int, ...], value: Tensor) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(
            f"tensor {name!r}: expected shape {list(expected)}, got {list(value.shape)}"
        )


_Slot = _ParamSlot | _Fp8Slot
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# model -> (tensor key, its slots). Kept beside the model, not on it: an attribute would be
# deep-copied and pickled with the model. The slots hold views of the model's storages, so
# while an entry lives no other tensor can take those addresses (the key stays unambiguous).
_SLOTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, _Slot]]] = (
    weakref.WeakKeyDictionary()
)


def _tensor_key(model: nn.Module) -> tuple:
    """Identity, address and shape of every parameter and buffer (not the values): equal keys
    mean the same tensors in the same places. A direct walk of the module tree, ~40x cheaper
    than building the slots (models/decode.py DecodeWeights.key_of does the same)."""
    key = []
    stack = [model]
    while stack:
        module = stack.pop()
        key.append(type(module))
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None:
                    key.append((id(t), t.data_ptr(), t.shape))
        for m in module._modules.values():
            if m is not None:
                stack.append(m)
    return tuple(key)


def hf_slots(model: nn.Module) -> dict[str, _Slot]:
    """HF on-disk weight name -> where it lives in `model`, in module order (read-only).

    Built once per model and reused while its parameters and buffers are the same tensors at
    the same addresses (a weight load writes into them in place): rebuilding it was about a
    third of the rollout's weight load, every step. Any swapped, moved or resized tensor, or
    a module replaced (e.g. quantized to FP8), rebuilds it."""
    key = _tensor_key(model)
    cached = _SLOTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    slots = _build_slots(model)
    _SLOTS[model] = (key, slots)
    return slots


def _build_slots(model: nn.Module) -> dict[str, _Slot]:
    slots: dict[str, _Slot] = {}
    seen: set[int] = set()
    first_mtp = _num_layers(model)
    for mname, module in model.named_modules():
        prefix = _disk_prefix(mname, first_mtp)
        if isinstance(module, ExpertBank | Fp8ExpertBank):
            for j in range(module.num_experts):
                for proj in _PROJECTIONS:
                    name = f"{prefix}{j}.{proj}.weight"
                    if isinstance(module, Fp8ExpertBank):
                        w8 = getattr(module, proj)[j]
                        scale = getattr(module, proj + SCALE_SUFFIX)[j]
                        slots[name] = _Fp8Slot(name, w8, scale, module.block)
                    else:
                        slots[name] = _BankSlot(name, module, j, proj)
            continue
        skip: tuple[str, ...] = ()
        if isinstance(module, Fp8Linear):
            name = prefix + "weight"
            slots[name] = _Fp8Slot(name, module.weight, module.weight_scale_inv, module.block)
            skip = ("weight", "weight_scale_inv")
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for pname, tensor in own:
            if pname in skip or id(tensor) in seen or tensor is None:
                continue
            seen.add(id(tensor))
            slots[prefix + pname] = _ParamSlot(prefix + pname, tensor)
    return slots


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", 0))


def _disk_prefix(module_name: str, first_mtp: int) -> str:
    """`mtp.{i}[.decoder].x` -> `model.layers.{first_mtp + i}.x.`; other names unchanged."""
    m = _MTP_MODULE.match(module_name)
    if m:
        module_name = f"model.layers.{first_mtp + int(m.group(1))}{module_name[m.end() :]}"
    return f"{module_name}." if module_name else ""


def iter_hf_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(HF on-disk name, tensor view) for every tensor of the model; tied lm_head omitted.

    Not through the cached map: an export may run on transient storage (FSDP's all-gathered
    parameters), which a cache entry would keep alive. The trainer keeps its own views
    (trainer/torch_state.py HfViews)."""
    for slot in _build_slots(model).values():
        yield from slot.items()


@torch.no_grad()
def load_hf_tensors(
    model: nn.Module,
    named: Iterable[tuple[str, Tensor]],
    *,
    strict: bool = True,
    num_layers: int,
    tied_lm_head: bool,
    fp8_block: tuple[int, int] | None = None,
) -> list[str]:
    """Copy HF-named tensors into `model`; returns the weight names loaded.

    Decoder layers past the model's own (num_layers main + its MTP layers) are skipped, as is
    lm_head.weight of a tied model. GLM-4.5's copies of the embedding and head inside an MTP
    layer are kept on that layer (MtpLayer.carry). Unknown names always raise; strict also
    requires every tensor.
    fp8_block: block size of incoming FP8 pairs (default 128x128).
    """
    block = tuple(fp8_block or DEFAULT_BLOCK)
    slots = hf_slots(model)
    total_layers = num_layers + len(getattr(model, "mtp", ()))
    pending: dict[str, dict[str, Tensor]] = {}
    loaded: list[str] = []
    for name, value in named:
        is_scale = name.endswith(SCALE_SUFFIX)
        base = name[: -len(SCALE_SUFFIX)] if is_scale else name
        slot = _lookup(slots, base, num_layers, total_layers, tied_lm_head)
        slot = slot or _carry(model, base, value)
        if slot is None:
            continue
        if not is_scale and value.dtype != FP8_DTYPE:
            slot.set_dense(value)
            loaded.append(base)
            continue
        entry = pending.setdefault(base, {})
        entry["scale" if is_scale else "w8"] = value
        if len(entry) == 2:
            slot.set_fp8(entry["w8"], entry["scale"], block)
            loaded.append(base)
            del pending[base]
    if pending:
        raise ValueError(
            "FP8 tensors without their pair (<x>.weight float8 + <x>.weight_scale_inv): "
            f"{sorted(pending)[:5]}"
        )
    if strict:
        done = set(loaded)
        missing = [n for n in slots if n not in done]
        if missing:
            raise ValueError(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    return loaded


def _lookup(
    slots: dict[str, _Slot], name: str, first_mtp: int, num_layers: int, tied: bool
) -> _Slot | None:
    """The slot of name; None for tensors to skip (num_layers counts main + MTP layers)."""
    slot = slots.get(name)
    if slot is not None:
        return slot
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= num_layers:
        log.debug("skipping %s (layer beyond the model's main and MTP layers)", name)
        return None
    if _MTP_COPY.match(name) and layer and int(layer.group(1)) >= first_mtp:
        return None  # an MTP layer's duplicate of the embedding or head: see _carry
    if tied and name == "lm_head.weight":
        return None
    close = difflib.get_close_matches(name, list(slots), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown tensor name {name!r}{hint}")


def _carry(model: nn.Module, name: str, value: Tensor) -> _Slot | None:
    """The slot of a GLM-4.5 MTP duplicate (embed_tokens / shared_head.head), created on first
    sight; None for any other name."""
    m = _MTP_COPY.match(name)
    mtp = getattr(model, "mtp", None)
    if m is None or mtp is None:
        return None
    index = int(m.group(1)) - _num_layers(model)
    if not 0 <= index < len(mtp):
        return None
    return _ParamSlot(name, mtp[index].carry(m.group(2), value))
