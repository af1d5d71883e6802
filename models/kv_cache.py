"""The KV cache of the inference path: per layer, K and V of every slot up to max_len.

Layout per layer: one tensor [num_slots, 2 * num_key_value_heads, max_len, head_dim], keys in
the first Hkv rows of dim 1 and values in the rest (one write per layer and step). A slot holds one
sequence; the caller (the rollout engine) owns slot allocation and each slot's length and
passes them to `Glm4MoeForCausalLM.forward_cached`. Nothing here tracks lengths, so reusing
a slot for a new sequence needs no reset: positions >= the row's own are never attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    layers: list[Tensor]  # per layer [num_slots, 2 * Hkv, max_len, head_dim]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache: num_slots={num_slots} and max_len={max_len} must be >= 1")
        shape = (num_slots, 2 * num_kv_heads, max_len, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])

    def keys(self, layer: int) -> Tensor:
        """[num_slots, Hkv, max_len, head_dim] view of a layer's keys."""
        t = self.layers[layer]
        return t[:, : t.shape[1] // 2]

    def values(self, layer: int) -> Tensor:
        """[num_slots, Hkv, max_len, head_dim] view of a layer's values."""
        t = self.layers[layer]
        return t[:, t.shape[1] // 2 :]

    @property
    def num_slots(self) -> int:
        return self.layers[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
