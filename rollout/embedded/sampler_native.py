"""rollout/embedded/sampler_kernels.c's inverse-CDF draw (sampler._inverse_cdf in one C call):
on the CPU its ~10 torch ops over a batch-64 [64, 512] took ~80-90 us a step, the call ~30."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from models import native_build

SOURCE = Path(__file__).with_name("sampler_kernels.c")
LANES = 8  # the kernel's rows summed together (its scratch is LANES x V)
_P, _L = ctypes.c_void_p, ctypes.c_long


@cache
def _kernels() -> ctypes.CDLL | None:
    return native_build.load(SOURCE, {"inverse_cdf_rows": [_P, _L, _L, _P, _P, _P, _P]})


def inverse_cdf(weights: Tensor, u: Tensor) -> Tensor | None:
    """The pick of sampler._inverse_cdf (bit for bit) for weights fp32 [B, V] and u float64
    [B] on the CPU; None where the kernel does not apply or cannot vouch for a row (a
    negative or non-finite weight, or a zero-weight pick): then the torch ops run."""
    if (
        weights.device.type != "cpu"
        or weights.dtype != torch.float32
        or u.dtype != torch.float64
        or not (weights.is_contiguous() and u.is_contiguous())
        or weights.dim() != 2
        or weights.numel() == 0
        or _kernels() is None
    ):
        return None
    rows, vocab = weights.shape
    pick = torch.empty(rows, dtype=torch.int64)
    irregular = torch.empty(1, dtype=torch.int64)
    scratch = torch.empty(LANES * vocab)
    _kernels().inverse_cdf_rows(
        weights.data_ptr(), rows, vocab, u.data_ptr(), pick.data_ptr(), irregular.data_ptr(),
        scratch.data_ptr(),
    )  # fmt: skip
    return pick if int(irregular) == 0 else None
