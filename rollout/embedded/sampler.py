"""Vectorised token sampling for the embedded engine: one call samples every row of a batch.

Logprob definition (the contract of buffer/episode.py, recomputed by the trainer): for the
sampled token `t` of a row, `logprob = log_softmax(logits / T)[t]` with `T` the row's
temperature, `T = 1` for greedy rows (temperature 0), and *no* top-k / top-p / min-p
renormalisation. Filtering only decides which tokens may be drawn.

Sampling is exact inverse-CDF sampling from the filtered distribution: one uniform number per
row, `u = hash(seed, counter)`, where `seed` is the request's `sampling_seed` (or a random one
drawn at admission) and `counter` is the number of tokens the sequence has generated so far.
The random stream of a request therefore depends only on its own seed and position, never on
which other requests share the batch: a request sampled alone and in a batch draws the same
numbers, and the same seed reproduces the same sample.

Filters follow SGLang's torch sampling backend: top_k keeps the k most likely tokens, top_p
keeps the shortest prefix of the full (unfiltered) sorted distribution whose mass before the
token is <= top_p, min_p drops tokens below `min_p * max_prob`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so every product of a 32-bit value stays inside int64.
_C1 = 0x7FEB352D
_C2 = 0x31848BAB
_C3 = 0x2C1B3C6D


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds); int64 in [0, 2**32) -> same."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 16)
    x = (x * _C3) & _M32
    return x ^ (x >> 15)


def hash_uniform(seeds: Tensor, counters: Tensor) -> Tensor:
    """float64 [B] uniforms in [0, 1 - 2**-24], a pure function of (seed, counter) per row.

    seeds: int64 [B] (any int64); counters: int64 [B] >= 0.
    """
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    h = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    h = _mix32((h + _mix32(counters & _M32)) & _M32)
    h = _mix32(((h ^ ((counters >> 32) & _M32)) + 0x632BE5AB) & _M32)
    return (h >> 8).to(torch.float64) / float(1 << 24)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step (all [B], on the logits' device).

    temperature float32 (0 => greedy), top_p float32 in (0, 1], top_k int64 (<= 0 or >= V
    => all), min_p float32 in [0, 1], seeds int64, counters int64 (tokens generated so far).
    """

    temperature: Tensor
    top_p: Tensor
    top_k: Tensor
    min_p: Tensor
    seeds: Tensor
    counters: Tensor


def _filter_sorted(probs: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """Apply top-k then top-p on the sorted distribution. Returns (masked sorted probs, idx)."""
    vocab = probs.shape[-1]
    sorted_probs, idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    drop = ranks[None, :] >= k[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before > top_p[:, None]
    return sorted_probs.masked_fill(drop, 0.0), idx


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index drawn from each row of unnormalised non-negative weights [B, V] given u [B]."""
    cdf = weights.cumsum(dim=-1)
    target = (u * cdf[:, -1].to(torch.float64)).to(cdf.dtype)
    pick = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    pick = pick.clamp(max=weights.shape[-1] - 1)
    # float rounding can land on a zero-weight tail token: fall back to the row's max weight
    bad = weights.gather(1, pick[:, None]).squeeze(1) <= 0
    return torch.where(bad, weights.argmax(dim=-1), pick)


def sample(logits: Tensor, params: SamplingBatch) -> tuple[Tensor, Tensor]:
    """Sample one token per row.

    logits: float32 [B, V]. Returns (tokens int64 [B], logprobs float32 [B]) with logprobs per
    the module docstring.
    """
    greedy = params.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    logp = torch.log_softmax(logits.float() / temp[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)
    sampled_rows = (~greedy).nonzero().squeeze(1)
    if sampled_rows.numel():
        tokens = tokens.clone()
        tokens[sampled_rows] = _sample_rows(logp[sampled_rows], params, sampled_rows)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _sample_rows(logp: Tensor, params: SamplingBatch, rows: Tensor) -> Tensor:
    """Draw from rows `rows` of the batch; logp [R, V] are their tempered log-probs."""
    probs = logp.exp()
    vocab = probs.shape[-1]
    top_k, top_p = params.top_k[rows], params.top_p[rows]
    min_p = params.min_p[rows]
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    u = hash_uniform(params.seeds[rows], params.counters[rows])
    needs_sort = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)
    out = torch.empty(rows.numel(), dtype=torch.int64, device=probs.device)
    plain = (~needs_sort).nonzero().squeeze(1)
    if plain.numel():
        out[plain] = _inverse_cdf(probs[plain], u[plain])
    sort_rows = needs_sort.nonzero().squeeze(1)
    if sort_rows.numel():
        # top_p is measured on the unfiltered distribution (as SGLang), min_p already applied
        full = logp[sort_rows].exp()
        kept, idx = _filter_sorted(full, top_k[sort_rows], top_p[sort_rows])
        kept = kept * (probs[sort_rows].gather(1, idx) > 0)
        out[sort_rows] = idx.gather(1, _inverse_cdf(kept, u[sort_rows])[:, None]).squeeze(1)
    return out
