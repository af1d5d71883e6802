"""The matmul floor of a generation workload: its matmul FLOPs and this machine's matmul rate.

Part of bench/engine_vs_hf.py. `workload_flops` counts the multiply-adds (x2) of every
matmul a generation must do for its real tokens, from the model config alone:

    per token, every layer: q/k/v and o projections; attention scores and weighted values
        over the causal context (query at position p sees p + 1 keys);
    dense layers: the SwiGLU MLP; MoE layers: router, k routed experts, shared experts;
    the LM head for each token whose logits are sampled (the prompt's last token and every
    generated token but the last, which is never fed back).

Padding, recomputation and anything that is not a matmul are not counted: this is what any
implementation must do, so time / (FLOPs / peak) says how far a side is from the floor.
`matmul_rates` times single matmuls on the model's own [rows, in] @ [in, out] shapes (the
decode batch's rows and a prefill's), so the peak is what this CPU reaches on this model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.config import ModelConfig


@dataclass
class Flops:
    prefill: float  # the prompts' tokens (and the LM head at each prompt's last token)
    decode: float  # the generated tokens fed back (new_tokens - 1 per sequence)

    @property
    def total(self) -> float:
        return self.prefill + self.decode


def linear_shapes(c: ModelConfig) -> list[tuple[int, int, int]]:
    """(in, out, times per token) of every weight matmul of one token, LM head excluded."""
    h, d = c.hidden_size, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    n_moe = max(c.num_hidden_layers - c.first_k_dense_replace, 0)
    dense = c.num_hidden_layers - n_moe
    i_moe, shared = c.moe_intermediate_size, c.moe_intermediate_size * c.n_shared_experts
    shapes = [
        (h, qkv, c.num_hidden_layers),
        (c.num_attention_heads * d, h, c.num_hidden_layers),
        (h, 2 * c.intermediate_size, dense),
        (c.intermediate_size, h, dense),
        (h, c.n_routed_experts, n_moe),  # router
        (h, 2 * i_moe, n_moe * c.num_experts_per_tok),
        (i_moe, h, n_moe * c.num_experts_per_tok),
    ]
    if shared:
        shapes += [(h, 2 * shared, n_moe), (shared, h, n_moe)]
    return [s for s in shapes if s[2] > 0]


def token_flops(c: ModelConfig, position: int, logits: bool) -> float:
    """Matmul FLOPs of one token at `position` (0-based) of its sequence."""
    weights = sum(2 * i * o * n for i, o, n in linear_shapes(c))
    # q.k over position + 1 keys and the weighted sum of as many values, per query head
    attention = 2 * 2 * c.num_attention_heads * c.head_dim * (position + 1) * c.num_hidden_layers
    head = 2 * c.hidden_size * c.vocab_size if logits else 0
    return float(weights + attention + head)


def workload_flops(c: ModelConfig, prompt_lens: list[int], new_tokens: int, samples: int) -> Flops:
    """Matmul FLOPs of generating `new_tokens` for each of `samples` copies of each prompt;
    a prompt is computed once per sample (no prefix sharing, as transformers does)."""
    prefill = decode = 0.0
    for n in prompt_lens:
        prefill += sum(token_flops(c, p, p == n - 1) for p in range(n))
        decode += sum(token_flops(c, p, True) for p in range(n, n + new_tokens - 1))
    return Flops(prefill * samples, decode * samples)


def _rate(rows: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    """Best GFLOP/s of [rows, k] @ [k, n] over `reps` timings (CPU clock of this process)."""
    a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    calls = max(3, int(2e8 / (2 * rows * k * n)))  # ~0.2 GFLOP per timing
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        for _ in range(calls):
            a @ b
        best = min(best, (time.process_time() - start) / calls)
    return 2 * rows * k * n / best / 1e9


def matmul_rates(
    c: ModelConfig, rows: list[int], dtype: torch.dtype, reps: int = 3
) -> dict[tuple[int, int, int], float]:
    """GFLOP/s of each distinct (rows, in, out) weight matmul of the model, LM head included."""
    shapes = {(i, o) for i, o, _ in linear_shapes(c)} | {(c.hidden_size, c.vocab_size)}
    return {(r, i, o): _rate(r, i, o, dtype, reps) for r in rows for i, o in sorted(shapes)}
