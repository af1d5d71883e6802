"""GLM-4.5/4.6's multi-token-prediction (MTP) layer: a draft head that predicts token t+2.

GLM checkpoints store `num_nextn_predict_layers` such layers after the main stack, as
`model.layers.{N + i}` with N = num_hidden_layers. Layer i holds `eh_proj` [H, 2H], `enorm`,
`hnorm`, `shared_head.norm`, and an MoE decoder layer (self_attn, mlp, input_layernorm,
post_attention_layernorm) named like a main layer. The embedding and lm_head are the main
model's (SGLang shares them with the target model); GLM-4.5 checkpoints also carry copies of
both (`embed_tokens.weight`, `shared_head.head.weight`), which are kept bit for bit but unused.

Computation (as SGLang's glm4_moe_nextn and transformers' MtpLayer): at position t of a
sequence, with h_t the main model's final (normed) hidden state and x_{t+1} the next token,

    g_t = eh_proj([enorm(embed(x_{t+1})), hnorm(h_t)])      (the embedding half first)
    o_t = shared_head.norm(decoder(g_t))                     (causal attention over g)
    logits_t = lm_head(o_t)  predicts x_{t+2}

The decoder sees token x_{t+1} at its own position t+1 (transformers' and Megatron's
convention; SGLang's position t gives the same result, RoPE being relative).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.batching import PackInfo
from models.layers import RMSNorm, RotaryEmbedding

# Tensors of GLM-4.5's MTP layer that duplicate the main embedding / lm_head (unused here).
CARRIED_COPIES = ("embed_tokens", "shared_head.head")


class _Carried(nn.Module):
    """A checkpoint tensor kept as is (a persistent buffer `weight`) and never computed with."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)


class MtpLayer(nn.Module):
    """One MTP layer around its decoder layer (handed in: the main model's DecoderLayer)."""

    def __init__(self, hidden_size: int, eps: float, decoder: nn.Module) -> None:
        super().__init__()
        self.enorm = RMSNorm(hidden_size, eps)
        self.hnorm = RMSNorm(hidden_size, eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.decoder = decoder
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden_size, eps)

    def carry(self, name: str, value: Tensor) -> Tensor:
        """Keep a GLM-4.5 duplicate (`embed_tokens` or `shared_head.head`) for re-export;
        returns the stored tensor (a copy of value on this layer's device)."""
        if name not in CARRIED_COPIES:
            raise ValueError(f"MTP layer: {name!r} is not one of {CARRIED_COPIES}")
        module = _Carried(value.detach().to(self.eh_proj.weight.device).clone())
        parent = self.shared_head if name == "shared_head.head" else self
        setattr(parent, name.rsplit(".", 1)[-1], module)
        return module.weight

    def forward_packed(
        self,
        next_embeds: Tensor,
        hidden: Tensor,
        rotary: RotaryEmbedding,
        pack: PackInfo,
        moe_out: list,
    ) -> Tensor:
        """next_embeds [T, H] (embedding of each position's next token), hidden [T, H] (the
        main model's normed hidden states) over the same pack -> normed MTP output [T, H]."""
        rope = rotary(pack.positions + 1, next_embeds.dtype)
        g = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(self.decoder.forward_packed(g, rope, pack, None, moe_out))


def next_token_ids(input_ids: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """For a pack input_ids int64 [T] at cu_seqlens [B + 1]: (the id of each position's next
    token in its sequence, 0 at each sequence's last position; bool [T], True where that next
    token exists)."""
    total = input_ids.numel()
    has_next = torch.ones(total, dtype=torch.bool, device=input_ids.device)
    has_next[cu_seqlens[1:].to(input_ids.device) - 1] = False
    shifted = torch.cat([input_ids[1:], input_ids.new_zeros(1)])
    return torch.where(has_next, shifted, torch.zeros_like(shifted)), has_next


def mtp_targets(input_ids: Tensor, cu_seqlens: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """(target ids int64 [T], valid bool [T]) of MTP layer `depth` (0-based): row t's
    target is input_ids[t + depth + 2] when that lies in the same sequence."""
    shift = depth + 2
    cu = cu_seqlens.to(input_ids.device)
    lengths = cu[1:] - cu[:-1]
    pack = PackInfo.build(cu, input_ids.numel())
    valid = pack.positions + shift < torch.repeat_interleave(lengths, lengths)
    index = (torch.arange(input_ids.numel(), device=input_ids.device) + shift).clamp(
        max=input_ids.numel() - 1
    )
    return torch.where(valid, input_ids[index], torch.zeros_like(input_ids)), valid
