"""What the weight-sync paths put on the wire, built without sglang, and the FP8 pair check.

flattened_bucket   SGLang's `flattened_bucket` dict over a `WeightBucket` payload, zero-copy
                   (its metadata are `types.SimpleNamespace` objects, which SGLang's
                   SafeUnpickler allows, standing in for FlattenedTensorMetadata)
serialize_object   SGLang's MultiprocessingSerializer format (ForkingPickler + base64)
broadcast_layout   the unpadded buffer SGLang's receiver allocates for a distributed bucket
check_fp8_pairs    `<x>.weight` float8_e4m3fn + `<x>.weight_scale_inv` float32 block scales,
                   as a block-FP8 SGLang server loads them (SGLang never re-quantises BF16)
"""

from __future__ import annotations

import base64
import io
import math
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from models.weight_update import WeightBucket, iter_bucket_tensors

FP8_DTYPE = torch.float8_e4m3fn


class WeightSyncError(RuntimeError):
    """A weight update failed or is malformed; the message names the tensor, path or worker."""


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype strings for /update_weights_from_distributed ("bfloat16", ...)."""
    return str(dtype).removeprefix("torch.")


def check_fp8_pairs(named: Iterable[tuple[str, Tensor]], block: tuple[int, int]) -> int:
    """Check that FP8 tensors come as SGLang's block-FP8 checkpoints expect them.

    Every float8_e4m3fn tensor must be `<x>.weight` [N, K] with a float32 partner
    `<x>.weight_scale_inv` [ceil(N/bn), ceil(K/bk)], and every scale must have its weight.
    Returns the number of pairs; raises WeightSyncError naming the first bad tensor.
    """
    tensors = dict(named)
    pairs = 0
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in tensors:
                raise WeightSyncError(f"fp8: {name} has no {name.removesuffix('_scale_inv')}")
            continue
        if t.dtype != FP8_DTYPE:
            continue
        if not name.endswith(".weight") or t.dim() != 2:
            raise WeightSyncError(f"fp8: {name} is float8 but not a 2-D `.weight`")
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            raise WeightSyncError(f"fp8: {name} has no {name}_scale_inv")
        want = (math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1]))
        if scale.dtype != torch.float32 or tuple(scale.shape) != want:
            raise WeightSyncError(
                f"fp8: {name}_scale_inv is {scale.dtype} {tuple(scale.shape)}, expected "
                f"torch.float32 {want} for weight {tuple(t.shape)} and block {block}"
            )
        pairs += 1
    return pairs


def flattened_bucket(bucket: WeightBucket) -> dict[str, Any]:
    """SGLang's `flattened_bucket` dict over the bucket payload, zero-copy (offsets as is)."""
    metadata = []
    for name, view in iter_bucket_tensors(bucket):
        start = bucket.offsets[len(metadata)]
        nbytes = view.numel() * view.element_size()
        metadata.append(
            types.SimpleNamespace(
                name=name,
                shape=torch.Size(view.shape),
                dtype=view.dtype,
                start_idx=start,
                end_idx=start + nbytes,
                numel=nbytes,
            )
        )
    return {"flattened_tensor": bucket.payload, "metadata": metadata}


def serialize_object(obj: Any) -> str:
    """SGLang's MultiprocessingSerializer format for any picklable object (no sglang needed).

    The caller must have set torch's sharing strategy to "file_system" for CPU tensors.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def broadcast_layout(bucket: WeightBucket) -> tuple[list[str], list[str], list[list[int]], Tensor]:
    """(names, dtypes, shapes, flat uint8) in the layout SGLang's receiver allocates for
    `flattened_bucket`: tensors back to back with no padding. Ordered by element size, largest
    first, so every tensor starts at a multiple of its element size (SGLang checks this)."""
    items = sorted(iter_bucket_tensors(bucket), key=lambda kv: -kv[1].element_size())
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in items])
    names = [n for n, _ in items]
    dtypes = [dtype_name(t.dtype) for _, t in items]
    shapes = [list(t.shape) for _, t in items]
    return names, dtypes, shapes, flat
