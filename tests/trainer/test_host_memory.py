"""trainer/host_memory.py: the trainer process keeps freed heap memory (glibc's mallopt)."""

from __future__ import annotations

import platform

import torch

from trainer.host_memory import retain_freed_memory


def test_retain_freed_memory_takes_on_glibc_and_allocations_still_work():
    applied = retain_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    x = torch.ones(512, 512)  # 1 MiB: served from the heap now, freed back into it
    del x
    assert torch.zeros(512, 512).sum().item() == 0.0
