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

from rollout.embedded import sampler_native

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
    `uniforms`, when given, equals hash_uniform(seeds, counters) (kv_slots.SlotPool precomputes
    them at admission so a step does not hash again).
    """

    temperature: Tensor
    top_p: Tensor
    top_k: Tensor
    min_p: Tensor
    seeds: Tensor
    counters: Tensor
    uniforms: Tensor | None = None  # float32 [B]: hash_uniform(seeds, counters), precomputed
    plain: bool = False  # promised: no row has a top-k, top-p or min-p filter (checks skipped)
    all_sampled: bool = False  # promised: no greedy row (no mask, no host sync to find them)
    unit_temperature: bool = False  # promised: every temperature is exactly 1 (no division)


def _filter_sorted(
    weights: Tensor, total: Tensor, top_k: Tensor, top_p: Tensor
) -> tuple[Tensor, Tensor]:
    """Top-k then top-p on the sorted distribution. weights [R, V] unnormalised, total [R]
    their sums. Returns (masked sorted weights, sort index)."""
    vocab = weights.shape[-1]
    sorted_w, idx = weights.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=weights.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    drop = ranks[None, :] >= k[:, None]
    mass_before = sorted_w.cumsum(dim=-1) - sorted_w
    drop |= mass_before > (top_p * total)[:, None]
    return sorted_w.masked_fill(drop, 0.0), idx


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index drawn from each row of unnormalised non-negative weights [B, V] given u [B]."""
    pick = sampler_native.inverse_cdf(weights, u)  # on the CPU: the ops below in one C call
    if pick is not None:
        return pick
    cdf = weights.cumsum(dim=-1)
    target = (u * cdf[:, -1].to(torch.float64)).to(cdf.dtype)
    pick = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    pick = pick.clamp(max=weights.shape[-1] - 1)
    # float rounding can land on a zero-weight tail token: fall back to the row's max weight
    bad = weights.gather(1, pick[:, None]).squeeze(1) <= 0
    if weights.device.type == "cpu" and not bool(bad.any()):  # the usual case; a CPU sync
        return pick  # is free, and an argmax + where over [B, V] a step was not
    return torch.where(bad, weights.argmax(dim=-1), pick)


def sample(logits: Tensor, params: SamplingBatch) -> tuple[Tensor, Tensor]:
    """Sample one token per row.

    logits: float32 [B, V]. Returns (tokens int64 [B], logprobs float32 [B]) with logprobs per
    the module docstring. Work: a handful of passes over [B, V]; a sort only for rows with
    top-k or top-p filters.
    """
    tokens, logprobs, _ = _sample(logits, params)
    return tokens, logprobs


def sample_greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """`sample` of a batch whose rows are all greedy (temperature 0), bit for bit, in 7 ops
    and without the sampling parameters: the argmax, and its logprob -log(sum(exp(z - max)))
    (z[argmax] - max is exactly 0; z = logits, as T = 1 for greedy rows)."""
    z = logits.float()
    zmax, tokens = z.max(dim=-1)
    total = (z - zmax[:, None]).exp_().sum(dim=-1)
    return tokens, total.log_().neg_()


def sample_with_top(
    logits: Tensor, params: SamplingBatch, rows: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`sample`, plus the k most likely tokens of the given rows and their logprobs (OpenAI's
    top_logprobs), by the same definition and from the same float32 tensors as the sampled
    logprobs: a sampled token among the top k has exactly its entry's logprob.

    rows int64 [R] (indices into the batch). Returns (tokens [B], logprobs [B], top ids int64
    [R, k'], top logprobs float32 [R, k']), k' = min(k, V), each row sorted descending.
    """
    tokens, logprobs, (z, zmax, total) = _sample(logits, params)
    values, ids = z[rows].topk(min(k, z.shape[-1]), dim=-1)
    top = values - zmax[rows][:, None] - total[rows].log()[:, None]
    return tokens, logprobs, ids, top


def _sample(logits: Tensor, params: SamplingBatch) -> tuple[Tensor, Tensor, tuple]:
    """(tokens, logprobs, (tempered logits z, their row max, sum of exp(z - max)))."""
    if params.all_sampled:  # an RL rollout's batch: the same values in fewer ops (x / 1 == x)
        z = logits.float()
        if not params.unit_temperature:
            z = z / params.temperature[:, None]
        zmax = z.amax(dim=-1)
        weights = (z - zmax[:, None]).exp_()
        total = weights.sum(dim=-1)
        tokens = _sample_rows(weights, total, params, None)
        logprobs = z.gather(1, tokens[:, None]).squeeze(1) - zmax - total.log()
        return tokens, logprobs, (z, zmax, total)
    greedy = params.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    z = logits.float() / temp[:, None]
    zmax, tokens = z.max(dim=-1)  # argmax of z == argmax of the logits (T > 0)
    weights = (z - zmax[:, None]).exp_()  # unnormalised probs; each row's max is exactly 1
    total = weights.sum(dim=-1)
    sampled = (~greedy).nonzero().squeeze(1)
    if sampled.numel() == tokens.numel():
        tokens = _sample_rows(weights, total, params, None)
    elif sampled.numel():
        tokens = tokens.clone()
        tokens[sampled] = _sample_rows(weights[sampled], total[sampled], params, sampled)
    logprobs = z.gather(1, tokens[:, None]).squeeze(1) - zmax - total.log()
    return tokens, logprobs, (z, zmax, total)


def _sample_rows(
    weights: Tensor, total: Tensor, params: SamplingBatch, rows: Tensor | None
) -> Tensor:
    """Draw one token per row of `weights` [R, V] (unnormalised tempered probs, row max 1);
    `rows` are their indices in the batch (None: all rows)."""

    def pick(t: Tensor) -> Tensor:
        return t if rows is None else t[rows]

    vocab = weights.shape[-1]
    if params.uniforms is not None:
        u = pick(params.uniforms).to(torch.float64)
    else:
        u = hash_uniform(pick(params.seeds), pick(params.counters))
    if params.plain:  # what the checks below would conclude, without their host syncs
        return _inverse_cdf(weights, u)
    top_k, top_p, min_p = pick(params.top_k), pick(params.top_p), pick(params.min_p)
    if bool((min_p > 0).any()):  # the max weight is 1, so the threshold is min_p itself
        weights = weights.masked_fill(weights < min_p[:, None], 0.0)
    needs_sort = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)
    if not bool(needs_sort.any()):
        return _inverse_cdf(weights, u)
    out = torch.empty(weights.shape[0], dtype=torch.int64, device=weights.device)
    plain = (~needs_sort).nonzero().squeeze(1)
    if plain.numel():
        out[plain] = _inverse_cdf(weights[plain], u[plain])
    sort_rows = needs_sort.nonzero().squeeze(1)
    # top_p is measured on the unfiltered distribution (as SGLang); min_p zeroes stay zero
    kept, idx = _filter_sorted(
        weights[sort_rows], total[sort_rows], top_k[sort_rows], top_p[sort_rows]
    )
    out[sort_rows] = idx.gather(1, _inverse_cdf(kept, u[sort_rows])[:, None]).squeeze(1)
    return out
