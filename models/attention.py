"""GQA self-attention with QK-norm and partial RoPE, over packed sequences or a KV cache.

HF module names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm). QK-norm is an RMSNorm over
head_dim applied to q and k before RoPE, as in HF's Glm4MoeAttention.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.batching import CacheBatch, PackInfo
from models.config import ModelConfig
from models.layers import RMSNorm, Rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def _qkv(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """x [..., hidden] -> q [..., Hq, D], k and v [..., Hkv, D] (q, k normed and rotated)."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope.apply(q), rope.apply(k), v

    def forward_packed(self, x: Tensor, rope: Rope, pack: PackInfo) -> Tensor:
        """x [T, hidden] of a pack -> [T, hidden]; causal within each sequence only."""
        q, k, v = self._qkv(x, rope)
        b, length = pack.num_seqs, pack.max_len
        if pack.padded_index is not None:
            q, k, v = (_scatter_rows(t, pack.padded_index, b * length) for t in (q, k, v))
        # [B, L, H, D] -> [B, H, L, D]; right padding keeps every real query's keys real.
        q, k, v = (t.view(b, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b * length, self.num_heads * self.head_dim)
        if pack.padded_index is not None:
            out = out.index_select(0, pack.padded_index)
        return self.o_proj(out)

    def forward_cached(
        self, x: Tensor, rope: Rope, batch: CacheBatch, k_cache: Tensor, v_cache: Tensor
    ) -> Tensor:
        """x [B, L, hidden] -> [B, L, hidden]; writes the real tokens' K/V into the cache.

        k_cache, v_cache: [num_slots, Hkv, max_len, D]. Each query attends to its slot's cache
        up to its own position (batch.mask); GQA runs as Hkv groups of G*L queries, so no
        K/V head is repeated.
        """
        b, length, _ = x.shape
        q, k, v = self._qkv(x, rope)  # [B, L, H, D]
        if batch.write_rows is None:
            slots = batch.slots.repeat_interleave(length) if length > 1 else batch.slots
            positions = batch.positions.reshape(-1)
            k_cache[slots, :, positions] = k.reshape(b * length, self.num_kv_heads, -1)
            v_cache[slots, :, positions] = v.reshape(b * length, self.num_kv_heads, -1)
        else:
            rows = batch.write_rows
            k_cache[batch.write_slots, :, batch.write_positions] = k.reshape(b * length, -1)[
                rows
            ].view(-1, self.num_kv_heads, self.head_dim)
            v_cache[batch.write_slots, :, batch.write_positions] = v.reshape(b * length, -1)[
                rows
            ].view(-1, self.num_kv_heads, self.head_dim)
        keys = k_cache[:, :, : batch.context].index_select(0, batch.slots)  # [B, Hkv, C, D]
        values = v_cache[:, :, : batch.context].index_select(0, batch.slots)
        groups = self.num_heads // self.num_kv_heads
        # q head h = kv * G + g  ->  [B, Hkv, G * L, D]
        q = q.view(b, length, self.num_kv_heads, groups, self.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, self.num_kv_heads, groups * length, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask)
        out = out.view(b, self.num_kv_heads, groups, length, self.head_dim).permute(0, 3, 1, 2, 4)
        return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim))


def _scatter_rows(x: Tensor, index: Tensor, rows: int) -> Tensor:
    """x [T, ...] -> zeros [rows, ...] with x[t] at row index[t] (differentiable)."""
    return x.new_zeros(rows, *x.shape[1:]).index_copy(0, index, x)
