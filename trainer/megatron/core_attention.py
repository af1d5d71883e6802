"""Causal core attention for megatron layer specs that handles packed (THD) sequences
without TransformerEngine.

Megatron's local `DotProductAttention` refuses `packed_seq_params`, and TE's attention needs
a GPU. This module takes megatron's core-attention call signature and runs
`torch.nn.functional.scaled_dot_product_attention` per packed sequence (causal within each
sequence, nothing across sequences), so a micro-batch of packed sequences is one [T, 1, H]
row with per-sequence RoPE positions -- exactly the varlen attention of the torch model. It is
the local spec's default; the TE spec uses `TEDotProductAttention` instead.

Shapes (np = attention heads on this TP rank, ng = query groups on this rank, hn = head dim):
  packed (qkv_format "thd"): query [T, np, hn], key/value [T, ng, hn] -> [T, np * hn]
  padded ("sbhd"):           query [S, B, np, hn], key/value [S, B, ng, hn] -> [S, B, np * hn]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class PackedCausalAttention(MegatronModule):
    """Causal softmax attention over packed or padded sequences (no dropout, no CP)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout: expected 0 for GLM-4.x, got {dropout}")
        if config.context_parallel_size != 1:
            raise ValueError("context_parallel_size > 1 needs the TransformerEngine spec")
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
        # q [..., np, L, hn], k/v [..., ng, L, hn]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if packed_seq_params is not None:
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            outs = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end > start:
                    q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
                    outs.append(self._attend(q, k, v).transpose(0, 1))
            out = torch.cat(outs, dim=0)
            return out.reshape(out.shape[0], -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, heads, S, hn]
        # megatron masks are True where attention is *forbidden*; SDPA wants the opposite.
        mask = None if attention_mask is None else ~attention_mask
        out = self._attend(q, k, v, mask)  # [B, np, S, hn]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
