"""Keep freed host memory in the trainer process instead of handing it back to the OS.

glibc serves allocations above its mmap threshold (128 KiB to start, raised on the fly) with
fresh mmaps and trims the heap top above its trim threshold; either way the next tensor of that
size lands on unmapped pages and pays one page fault per 4 KiB as it is first written. A
training step allocates and frees the same few hundred activations and gradients every time
(the e2e toy step: [383, 512] fp32 is 784 KiB), so on the CPU that is hundreds of faults per
step (measured 130-600) and a few ms of CPU. Fixed thresholds turn the dynamic adjustment
off and let the heap keep what the step freed for the next step; the process's footprint is
its peak step, which it reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20  # free heap top kept before trimming


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library
    has no mallopt (not glibc) or refuses (then nothing changed but that call)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.info("mallopt refused the thresholds: freed host memory goes back to the OS")
    return ok
