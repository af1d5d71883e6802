"""The plain export's layout, kept: each version's weight update is one torch.cat per bucket.

`models.weight_update.build_weight_update` converts every tensor (a no-op cast when the
update keeps the model's dtype), sizes the buckets and lays out each payload, ~120 tensors'
Python a version for the toy model. When nothing is converted (no FP8, the model's dtype,
payloads where the weights are, contiguous views), that work gives the same layout every
version: this keeps it, the uint8 views of the live weights and their alignment padding in
payload order, and builds each version's payloads from them. The first build goes through
build_weight_update and is checked byte for byte against the kept parts; anything the fast
path cannot reproduce falls back to build_weight_update every time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from models.weight_update import DTYPES, WeightBucket, WeightUpdate, build_weight_update


@dataclass
class _Bucket:
    template: WeightBucket  # names, shapes, dtypes, offsets (its payload is not reused)
    parts: list[Tensor]  # uint8 views of the live weights and zero padding, payload order
    payload: Tensor | None = None  # the last host payload built: refilled once unreferenced


def _bucket_parts(bucket: WeightBucket, tensors: list[Tensor]) -> list[Tensor] | None:
    """The payload of `bucket` as views of `tensors` (its tensors, in order) and padding;
    None when a tensor is not itself what the payload holds (converted or not contiguous)."""
    zeros = torch.zeros(64, dtype=torch.uint8, device=bucket.payload.device)
    parts, pos = [], 0
    for t, dtype, off in zip(tensors, bucket.dtypes, bucket.offsets, strict=True):
        if t.dtype != DTYPES[dtype] or not t.is_contiguous() or t.device != zeros.device:
            return None
        if off - pos > zeros.numel():
            return None
        if off > pos:
            parts.append(zeros[: off - pos])
        raw = t.reshape(-1).view(torch.uint8)  # a view: t is contiguous
        parts.append(raw)
        pos = off + raw.numel()
    if bucket.nbytes - pos > zeros.numel():
        return None
    if bucket.nbytes > pos:
        parts.append(zeros[: bucket.nbytes - pos])
    return parts


class ExportPlan:
    """Builds weight updates of a fixed list of (HF name, live tensor view), keeping the
    layout between versions (see the module docstring). `key` identifies the list (the
    caller's: HfViews rebuilds it when the model's tensors move)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._buckets: list[_Bucket] | None = None  # None: no fast path for this key

    def build(
        self,
        key: tuple,
        views: list[tuple[str, Tensor]],
        version: int,
        *,
        bucket_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> WeightUpdate:
        key = (key, bucket_bytes, dtype, device)
        if key == self._key and self._buckets is not None:
            return WeightUpdate(int(version), [_fresh(b) for b in self._buckets], None)
        update = build_weight_update(
            views, version, bucket_bytes=bucket_bytes, dtype=dtype, device=device
        )
        if key != self._key:  # planned once per layout: a layout without a fast path stays so
            self._key, self._buckets = key, _plan(update, views)
        return update


def _plan(update: WeightUpdate, views: list[tuple[str, Tensor]]) -> list[_Bucket] | None:
    names = [n for b in update.buckets for n in b.names]
    if names != [n for n, _ in views]:  # a converted tensor added or renamed entries
        return None
    buckets, start = [], 0
    for bucket in update.buckets:
        tensors = [t for _, t in views[start : start + len(bucket.names)]]
        start += len(bucket.names)
        parts = _bucket_parts(bucket, tensors)
        if parts is None or not torch.equal(torch.cat(parts), bucket.payload):
            return None
        buckets.append(_Bucket(bucket, parts))
    return buckets


def _fresh(bucket: _Bucket) -> WeightBucket:
    """A new bucket: a payload holding a copy of the weights now, and metadata lists.

    A host payload nobody references any more (the last update was pickled into Ray's
    object store and dropped) is refilled in place: a fresh one is a new mmap of the whole
    bucket whose pages fault in during the copy (a 36M fp32 model's export: 85 against 11 ms
    a step). A payload still held (by its update, a view of a tensor in it, or the numpy
    array its pickling makes: see `_unreferenced`) is never overwritten: the bucket then
    gets a fresh one."""
    t = bucket.template
    if _unreferenced(bucket):
        torch.cat(bucket.parts, out=bucket.payload)
    else:
        bucket.payload = torch.cat(bucket.parts)
    return WeightBucket(
        names=list(t.names),
        shapes=list(t.shapes),
        dtypes=list(t.dtypes),
        payload=bucket.payload,
        offsets=list(t.offsets),
    )


def _unreferenced(bucket: _Bucket) -> bool:
    """Whether only `bucket` holds its host payload: one Python reference (sys.getrefcount
    sees it and its own argument) and one tensor on the storage (torch's use count sees it
    and the UntypedStorage asked; a view or a numpy array over the payload adds one)."""
    payload = bucket.payload
    if payload is None or payload.device.type != "cpu" or sys.getrefcount(payload) > 3:
        return False  # 3: the attribute, the local and the argument
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: absent = never reuse
    return use_count is not None and use_count(payload.untyped_storage()._cdata) == 2
