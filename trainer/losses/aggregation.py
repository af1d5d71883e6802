"""Loss aggregation: how per-token losses [T] of packed sequences become one scalar.

Three ways (the names of `AlgorithmConfig.loss_agg`):
  token_mean           sum_t m_t x_t / sum_t m_t                    (every token weighs the same)
  seq_mean_token_sum   mean over sequences of sum_t m_t x_t          (Dr.GRPO-style, no length norm)
  seq_mean_token_mean  mean over sequences of (sum_t m_t x_t / sum_t m_t)   (GRPO paper, GSPO)
Sequences without a trainable token are not counted in the sequence means.

With gradient accumulation over micro-batches (and data parallel ranks) the mean must be over
the whole step, not per micro-batch: pass `denom`, the step-wide count of tokens (token_mean)
or of sequences (the two sequence means), summed from `Aggregator.count`. The micro-batch
results then *sum* to the step's loss. With `denom=None` this call's own count is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Aggregation = Callable[[Tensor, Tensor, Tensor, int, "float | Tensor | None"], Tensor]


def _seq_sums(x: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    """float [num_seqs]: per-sequence sum of x [T]."""
    out = torch.zeros(num_seqs, dtype=x.dtype, device=x.device)
    return out.index_add(0, seq_ids, x)


def token_mean(
    x: Tensor, mask: Tensor, seq_ids: Tensor, num_seqs: int, denom: float | Tensor | None = None
) -> Tensor:
    """sum(mask * x) / denom (denom defaults to sum(mask), at least 1). x, mask: float [T]."""
    total = (x * mask).sum()
    if denom is None:
        denom = mask.sum().clamp_min(1.0)
    return total / denom


def seq_mean_token_sum(
    x: Tensor, mask: Tensor, seq_ids: Tensor, num_seqs: int, denom: float | Tensor | None = None
) -> Tensor:
    """Sum of each sequence's masked token sum, / denom (default: sequences with a token)."""
    total = (x * mask).sum()
    if denom is None:
        denom = num_trainable_seqs(mask, seq_ids, num_seqs).clamp_min(1.0)
    return total / denom


def seq_mean_token_mean(
    x: Tensor, mask: Tensor, seq_ids: Tensor, num_seqs: int, denom: float | Tensor | None = None
) -> Tensor:
    """Sum of each sequence's masked token mean, / denom (default: sequences with a token)."""
    sums = _seq_sums(x * mask, seq_ids, num_seqs)
    counts = _seq_sums(mask, seq_ids, num_seqs)
    means = sums / counts.clamp_min(1.0)
    if denom is None:
        denom = (counts > 0).sum().to(x.dtype).clamp_min(1.0)
    return means.sum() / denom


def num_trainable_seqs(mask: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    """float scalar: sequences with at least one token where mask > 0."""
    counts = _seq_sums(mask.float(), seq_ids, num_seqs)
    return (counts > 0).sum().float()


def token_count(mask: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    """float scalar: tokens where mask > 0 (token_mean's denominator share)."""
    return mask.float().sum()


@dataclass(frozen=True)
class Aggregator:
    """An aggregation and its denominator.

    `count(mask, seq_ids, num_seqs)` is one micro-batch's share of the step-wide denominator:
    sum it over the step's micro-batches (all-reduce it over ranks) and pass the total as
    `denom` to `reduce(x, mask, seq_ids, num_seqs, denom)`.
    """

    reduce: Aggregation
    count: Callable[[Tensor, Tensor, int], Tensor]


AGGREGATIONS: dict[str, Aggregator] = {
    "token_mean": Aggregator(token_mean, token_count),
    "seq_mean_token_sum": Aggregator(seq_mean_token_sum, num_trainable_seqs),
    "seq_mean_token_mean": Aggregator(seq_mean_token_mean, num_trainable_seqs),
}
