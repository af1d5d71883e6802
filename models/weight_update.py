"""The trainer -> rollout weight-update message: versioned buckets of HF-named tensors.

A bucket packs many tensors into one flat uint8 payload (each tensor at a 16-byte aligned
offset), so a bucket is one object to ship (Ray object store, HTTP body, a broadcast) and its
tensors are zero-copy views on the receiving side. With `fp8_block`, every quantized linear
weight travels as `<x>.weight` float8_e4m3fn + `<x>.weight_scale_inv` fp32, both in the same
bucket; everything else is cast to `dtype`, except the router's e_score_correction_bias,
which stays fp32 (its steps are far below bf16 resolution near 1).

Devices: conversion (casts, FP8 quantization) runs where the tensors are, e.g. on the
trainer's GPU. The payloads are on the CPU by default, since an update that leaves the
process (a Ray object, an HTTP body, a file) carries host bytes; `device=` keeps them on the
GPU for an engine in the same process on the same GPU, and `apply_weight_update` then copies
GPU to GPU. `encode_weight_update` always produces host bytes.

Pickling (Ray's object store): a host payload pickles as a numpy array, so with protocol 5
its bytes travel out of band: written once into the store and read back as a zero-copy view
of the store's shared memory (torch's own tensor pickling goes through torch.save, a full
copy more on each side; measured in bench/weight_sync.py). Such a payload is read-only
memory shared by every reader of the object: receivers copy out of it and never write into it.

Wire format of `encode_weight_update`: b"PHWU", u32 format version, u64 header length, a
JSON header (version, fp8_block, per bucket: names, shapes, dtypes, offsets, nbytes), zero
padding to 16 bytes, then each bucket's payload (each padded to 16 bytes).
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from torch import Tensor, nn

from models.fp8 import FP8_DTYPE, is_quantized_name, quantize_blockwise
from models.lora import is_adapter_name

ALIGN = 16
MAGIC = b"PHWU"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<4sIQ")
KEEP_FP32 = ("e_score_correction_bias", "_scale_inv")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"weight update: unsupported tensor dtype {dtype}")
    return name


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class WeightBucket:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]  # torch dtype names: "bfloat16", "float8_e4m3fn", "float32", ...
    payload: Tensor  # uint8 [nbytes]: the tensors back to back
    offsets: list[int] = field(default_factory=list)  # byte offset of each tensor in payload

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    def __reduce__(self) -> tuple:
        """A host payload pickles as a numpy array (out of band with protocol 5: see the
        module docstring); a GPU payload as torch pickles it."""
        fields = (self.names, self.shapes, self.dtypes)
        if self.payload.device.type != "cpu":
            return (WeightBucket, (*fields, self.payload, self.offsets))
        return (_bucket_from_host, (*fields, self.payload.numpy(), self.offsets))


def _bucket_from_host(
    names: list[str],
    shapes: list[tuple[int, ...]],
    dtypes: list[str],
    payload: np.ndarray,
    offsets: list[int],
) -> WeightBucket:
    with warnings.catch_warnings():  # a read-only store buffer: receivers only read it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(payload)
    return WeightBucket(names, shapes, dtypes, tensor, offsets)


@dataclass
class WeightUpdate:
    version: int
    buckets: list[WeightBucket]
    fp8_block: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)


def _pack(items: list[tuple[str, Tensor]], device: torch.device) -> WeightBucket:
    """One bucket; its payload is one torch.cat of the tensors' bytes and their zero padding
    when all are on `device` (one call instead of three tensor ops per tensor: about half
    the export's Python time)."""
    offsets, pos = [], 0
    raws, parts = [], []
    zeros = torch.zeros(ALIGN, dtype=torch.uint8, device=device)
    for _, t in items:
        offsets.append(pos)
        raw = t.detach().reshape(-1).view(torch.uint8)  # reshape copies only a strided tensor
        raws.append(raw)
        parts.append(raw)
        end = pos + raw.numel()
        pos = _aligned(end)
        if pos != end:
            parts.append(zeros[: pos - end])
    if all(raw.device == device for raw in raws):
        payload = torch.cat(parts)
    else:  # the one device -> host copy of a cross-process update, tensor by tensor
        payload = torch.empty(pos, dtype=torch.uint8, device=device)  # written once, below
        ends = offsets[1:] + [pos]
        for raw, off, end in zip(raws, offsets, ends):
            payload[off : off + raw.numel()].copy_(raw)
            payload[off + raw.numel() : end].zero_()  # alignment padding
    return WeightBucket(
        names=[n for n, _ in items],
        shapes=[tuple(t.shape) for _, t in items],
        dtypes=[_dtype_name(t.dtype) for _, t in items],
        payload=payload,
        offsets=offsets,
    )


def _convert(
    name: str, t: Tensor, fp8_block: tuple[int, int] | None, dtype: torch.dtype
) -> list[tuple[str, Tensor]]:
    if t.dtype == FP8_DTYPE or name.endswith(KEEP_FP32):
        return [(name, t if t.dtype == FP8_DTYPE else t.float())]
    if fp8_block is not None and is_quantized_name(name):
        w8, scale = quantize_blockwise(t.detach(), fp8_block)
        return [(name, w8), (name + "_scale_inv", scale)]
    return [(name, t.detach().to(dtype))]


def build_weight_update(
    named_tensors: Iterable[tuple[str, Tensor]],
    version: int,
    *,
    bucket_bytes: int = 512 * 2**20,
    fp8_block: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> WeightUpdate:
    """Bucket HF-named tensors (e.g. model.hf_state_dict()) into a versioned update.

    A bucket holds at most bucket_bytes unless a single tensor (or FP8 pair) is larger.
    device: where the payloads live (see the module docstring): the CPU for an update that
    leaves the process, the tensors' GPU for an engine in the same process.
    """
    device = torch.device(device)
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: expected >= 1, got {bucket_bytes}")
    block = tuple(fp8_block) if fp8_block is not None else None
    buckets: list[WeightBucket] = []
    current: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        group = _convert(name, tensor, block, dtype)
        group_bytes = sum(_aligned(t.nbytes) for _, t in group)
        if current and size + group_bytes > bucket_bytes:
            buckets.append(_pack(current, device))
            current, size = [], 0
        current.extend(group)
        size += group_bytes
    if current:
        buckets.append(_pack(current, device))
    return WeightUpdate(int(version), buckets, block)


def iter_bucket_tensors(bucket: WeightBucket) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) views into the bucket's payload (no copies)."""
    payload = bucket.payload
    for name, shape, dtype, off in zip(bucket.names, bucket.shapes, bucket.dtypes, bucket.offsets):
        torch_dtype = DTYPES[dtype]
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch_dtype.itemsize
        yield name, payload[off : off + nbytes].view(torch_dtype).view(shape)


def encode_weight_update(update: WeightUpdate) -> bytes:
    """Serialise to the compact binary format described in the module docstring."""
    header = {
        "version": update.version,
        "fp8_block": list(update.fp8_block) if update.fp8_block is not None else None,
        "buckets": [
            {
                "names": b.names,
                "shapes": [list(s) for s in b.shapes],
                "dtypes": b.dtypes,
                "offsets": b.offsets,
                "nbytes": b.nbytes,
            }
            for b in update.buckets
        ],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    start = _aligned(_PREAMBLE.size + len(head))
    parts = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head)), head]
    parts.append(b"\0" * (start - _PREAMBLE.size - len(head)))
    for b in update.buckets:
        raw = b.payload.cpu().numpy().tobytes()  # bytes leave the process: host memory
        parts.append(raw + b"\0" * (_aligned(len(raw)) - len(raw)))
    return b"".join(parts)


def decode_weight_update(data: bytes | bytearray | memoryview) -> WeightUpdate:
    """Inverse of encode_weight_update. Payloads are views into `data` when it is writable
    (bytearray, writable memoryview); read-only bytes are copied once."""
    view = memoryview(data)
    if view.readonly:
        view = memoryview(bytearray(view))
    if len(view) < _PREAMBLE.size:
        raise ValueError("weight update: message shorter than its preamble")
    magic, fmt, head_len = _PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC or fmt != FORMAT_VERSION:
        raise ValueError(f"weight update: bad magic/format {magic!r}/{fmt}, expected {MAGIC!r}/1")
    header = json.loads(bytes(view[_PREAMBLE.size : _PREAMBLE.size + head_len]))
    pos = _aligned(_PREAMBLE.size + head_len)
    buckets = []
    for b in header["buckets"]:
        if pos + b["nbytes"] > len(view):
            raise ValueError("weight update: message truncated inside a bucket payload")
        payload = torch.frombuffer(view, dtype=torch.uint8, offset=pos, count=b["nbytes"])
        shapes = [tuple(s) for s in b["shapes"]]
        buckets.append(WeightBucket(b["names"], shapes, b["dtypes"], payload, b["offsets"]))
        pos += _aligned(b["nbytes"])
    block = tuple(header["fp8_block"]) if header["fp8_block"] is not None else None
    return WeightUpdate(header["version"], buckets, block)


def apply_weight_update(model: nn.Module, update: WeightUpdate) -> None:
    """Load every bucket into a plain or FP8-quantized Glm4MoeForCausalLM (strict=False).

    FP8 pairs go into FP8 layers as they are and are dequantized into plain layers; dense
    weights sent to FP8 layers are quantized with the layer's block size.
    """
    tensors = chain.from_iterable(iter_bucket_tensors(b) for b in update.buckets)
    if update.buckets and is_adapter_name(update.buckets[0].names[0]):
        from models.lora_merge import apply_adapter_update  # LoRA: merged onto the kept base

        apply_adapter_update(model, tensors)
        return
    model.load_hf_state_dict(tensors, strict=False, fp8_block=update.fp8_block)
