"""GQA self-attention with QK-norm and partial RoPE over packed sequences (the training path;
the KV-cache path is models.decode, on fused views of these weights).

HF module names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm). QK-norm is an RMSNorm over
head_dim applied to q and k before RoPE, as in HF's Glm4MoeAttention.
"""

from __future__ import annotations

from torch import Tensor, nn

from models import rms_norm_native
from models.attention_paths import attend_paths, training_sdpa
from models.batching import PackInfo
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
            pairs = ((q, self.q_norm), (k, self.k_norm))
            if rope.perm is not None and all(
                rms_norm_native.qk_norm_rope_usable(t, n.weight, rope.cos, rope.sin)
                for t, n in pairs
            ):  # fp32 CPU: each norm + rotation in two C calls instead of ~30 ops
                q, k = (
                    rms_norm_native.qk_norm_rope(t, n.weight, n.eps, rope.cos, rope.sin, rope.perm)
                    for t, n in pairs
                )
                return q, k, v
            q, k = self.q_norm(q), self.k_norm(k)
        return rope.apply(q), rope.apply(k), v

    def forward_packed(self, x: Tensor, rope: Rope, pack: PackInfo) -> Tensor:
        """x [T, hidden] of a pack -> [T, hidden]; causal within each sequence only (tree
        rows: each completion sees its prompt and itself)."""
        q, k, v = self._qkv(x, rope)
        if pack.paths is not None:  # length buckets of causal paths
            return self.o_proj(attend_paths(q, k, v, pack.paths))
        b, length = pack.num_seqs, pack.max_len
        if pack.padded_index is not None:
            q, k, v = (_scatter_rows(t, pack.padded_index, b * length) for t in (q, k, v))
        # [B, L, H, D] -> [B, H, L, D]; right padding keeps every real query's keys real.
        q, k, v = (t.view(b, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = training_sdpa(q, k, v, pack.attn_mask)  # tree mask: a completion sees its prompt
        out = out.transpose(1, 2).reshape(b * length, self.num_heads * self.head_dim)
        if pack.padded_index is not None:
            out = out.index_select(0, pack.padded_index)
        return self.o_proj(out)


def _scatter_rows(x: Tensor, index: Tensor, rows: int) -> Tensor:
    """x [T, ...] -> zeros [rows, ...] with x[t] at row index[t] (differentiable)."""
    return x.new_zeros(rows, *x.shape[1:]).index_copy(0, index, x)
