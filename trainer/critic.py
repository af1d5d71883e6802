"""The PPO critic: the policy's architecture (its trunk) with a scalar value head.

`values(input_ids, cu_seqlens)` returns float32 [T] aligned like logprobs: values[t] is the
value of the state *before* token t (the head applied to the hidden state at t - 1), 0 at the
first token of each sequence. The critic starts from a copy of the actor's weights; its
lm_head is kept (unused) so the trunk stays a complete, checkpointable model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.glm4moe import Glm4MoeForCausalLM


class ValueModel(nn.Module):
    """trunk: a Glm4MoeForCausalLM; head: Linear(hidden, 1) initialised to zero."""

    def __init__(self, trunk: Glm4MoeForCausalLM) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.hidden_size, 1, dtype=trunk.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_actor(cls, actor: Glm4MoeForCausalLM) -> ValueModel:
        """A critic whose trunk is a deep copy of the actor (same weights, separate tensors)."""
        return cls(copy.deepcopy(actor))

    def values(self, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """float32 [T]: V(prefix before token t); 0 at each sequence's first token."""
        hidden = self.trunk.forward_packed(input_ids, cu_seqlens).hidden
        v = self.head(hidden).squeeze(-1).float()
        shifted = torch.cat([v.new_zeros(1), v[:-1]])
        starts = torch.zeros_like(shifted, dtype=torch.bool)
        starts[cu_seqlens[:-1]] = True
        return torch.where(starts, torch.zeros_like(shifted), shifted)
