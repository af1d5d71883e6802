"""One arena for the CPU decode weights, on 2 MiB pages, in the order a decode step reads them.

A batch-1 decode step streams ~44 MB of weights (the 36M shape of bench/decode_bound.py) as
~30 GEMVs over 0.75-6 MB matrices. Out of cache, a one-row GEMV over separately allocated
4 KiB-paged matrices read ~11-12 GB/s on [512, 512]-wide shapes here; the same matrices copied
into one buffer on transparent huge pages (`madvise(MADV_HUGEPAGE)`, which this machine's THP
setting `madvise` honours; torch's own THP_MEM_ALLOC_ENABLE skips the < 2 MiB matrices)
read ~13-14 GB/s, and the whole batch-1 step took 8-13 % less CPU time (ad-hoc A/B,
alternated, best of 8). The buffer is freed with the last view of it.
"""

from __future__ import annotations

import mmap

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes: every tensor starts on a cache line


def _buffer(nbytes: int) -> Tensor:
    """uint8 [nbytes], 2 MiB-aligned on anonymous memory advised for huge pages; a plain
    tensor where mmap or madvise is not available."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError:  # no THP in this kernel: still one buffer, in access order
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def pack(tensors: list[Tensor]) -> list[Tensor]:
    """Contiguous copies of CPU tensors (any layout, any dtype), consecutive in one arena in
    the given order; the same values, shapes and dtypes."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    arena = _buffer(end)
    out = []
    for t, start in zip(tensors, offsets, strict=True):
        view = arena[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        out.append(view.copy_(t))
    return out
