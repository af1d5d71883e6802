"""The vectorised sampler against an independent numpy reference of the filtered distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout.embedded.sampler import (
    SamplingBatch,
    hash_uniform,
    sample,
    sample_greedy,
    sample_with_top,
)

torch.set_num_threads(1)


def _batch(b: int, *, temp=1.0, top_p=1.0, top_k=0, min_p=0.0, seeds=None, counters=None):
    return SamplingBatch(
        temperature=torch.full((b,), temp, dtype=torch.float32),
        top_p=torch.full((b,), top_p, dtype=torch.float32),
        top_k=torch.full((b,), top_k, dtype=torch.int64),
        min_p=torch.full((b,), min_p, dtype=torch.float32),
        seeds=torch.arange(b, dtype=torch.int64) * 7919 + 11 if seeds is None else seeds,
        counters=torch.zeros(b, dtype=torch.int64) if counters is None else counters,
    )


def _reference(logits: np.ndarray, temp: float, top_k: int, top_p: float, min_p: float):
    """SGLang's torch backend semantics, written independently in numpy (float64)."""
    z = logits / temp
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    sp = p[order]
    keep = np.ones_like(sp, dtype=bool)
    if top_k > 0:
        keep[top_k:] = False
    keep &= (np.cumsum(sp) - sp) <= top_p
    keep &= sp >= sp[0] * min_p
    q = np.zeros_like(p)
    q[order[keep]] = sp[keep]
    return q / q.sum()


def test_hash_uniform_is_deterministic_and_uniform():
    seeds = torch.arange(50_000, dtype=torch.int64) * 104729 - 3
    u = hash_uniform(seeds, torch.zeros_like(seeds))
    assert torch.equal(u, hash_uniform(seeds, torch.zeros_like(seeds)))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.01
    u2 = hash_uniform(seeds, torch.ones_like(seeds))
    assert float((u2 - u).abs().mean()) > 0.2  # the counter changes the draw
    # consecutive counters of one seed are uncorrelated
    steps = hash_uniform(torch.full((20_000,), 42), torch.arange(20_000))
    a, b = steps[:-1] - 0.5, steps[1:] - 0.5
    assert abs(float((a * b).mean() / (a * a).mean())) < 0.03


def test_greedy_rows_take_argmax_with_t1_logprob():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    tokens, logprobs = sample(logits, _batch(5, temp=0.0, top_k=3, top_p=0.5))
    assert torch.equal(tokens, logits.argmax(-1))
    ref = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "temp,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 4, 0.9, 0.15)],
)
def test_empirical_distribution_matches_reference(temp, top_k, top_p, min_p):
    logits_row = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0, 0.9, -3.0])
    n = 40_000
    logits = logits_row.repeat(n, 1)
    tokens, logprobs = sample(logits, _batch(n, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p))
    q = _reference(logits_row.double().numpy(), temp, top_k, top_p, min_p)
    freq = np.bincount(tokens.numpy(), minlength=len(q)) / n
    tol = 5 * np.sqrt(q * (1 - q) / n) + 1e-9
    assert np.all(np.abs(freq - q) <= tol), (freq, q)
    assert np.all(freq[q == 0] == 0)  # filtered tokens are never drawn
    # logprob: tempered log-softmax at the token, no renormalisation by the filters
    full = torch.log_softmax(logits_row.double() / temp, -1)
    torch.testing.assert_close(logprobs.double(), full[tokens], atol=1e-5, rtol=0)


def test_row_draw_does_not_depend_on_batch_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(16, 300)
    seeds = torch.randint(0, 2**62, (16,))
    counters = torch.randint(0, 100, (16,))
    params = _batch(16, temp=0.9, top_p=0.95, seeds=seeds, counters=counters)
    params.top_k[::3] = 20  # mixed filters in one batch
    params.temperature[::4] = 0.0
    together, lp_together = sample(logits, params)
    for i in range(16):
        rows = {f: v[i : i + 1] for f, v in vars(params).items() if torch.is_tensor(v)}
        one = SamplingBatch(**rows)
        alone, lp_alone = sample(logits[i : i + 1], one)
        assert int(alone) == int(together[i])
        assert float(lp_alone) == pytest.approx(float(lp_together[i]), abs=1e-6)


@pytest.mark.parametrize("temp", [0.0, 0.7, 1.0])
def test_sample_with_top_adds_the_top_k_without_changing_the_sample(temp):
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)) * 3
    params = _batch(5, temp=temp, top_p=0.9)
    tokens, logprobs = sample(logits, params)
    rows = torch.tensor([1, 3])
    t2, lp2, ids, top = sample_with_top(logits, params, rows, 6)
    assert torch.equal(t2, tokens) and torch.equal(lp2, logprobs)  # same draw, same numbers
    want = torch.log_softmax(logits[rows] / (temp or 1.0), dim=-1).topk(6)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(top, want.values, atol=1e-5, rtol=0)
    assert bool((top[:, :-1] >= top[:, 1:]).all())
    for j, r in enumerate(rows.tolist()):  # the sampled token's logprob is its entry, exactly
        hit = (ids[j] == tokens[r]).nonzero()
        if hit.numel():
            assert top[j, hit[0, 0]] == logprobs[r]
        else:
            assert logprobs[r] <= top[j, -1]
    assert sample_with_top(logits, params, rows, 99)[2].shape == (2, 40)  # k capped at V


@pytest.mark.parametrize("greedy_rows", [0, 3])
def test_plain_batches_draw_exactly_what_the_checked_path_draws(greedy_rows):
    """`plain` (no filters, promised by SlotPool) skips the filter checks and their host
    syncs; the tokens and logprobs are the same bits as the checked path's."""
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(3)) * 3
    checked = _batch(12, temp=0.7, counters=torch.arange(12, dtype=torch.int64))
    checked.temperature[:greedy_rows] = 0.0
    plain = SamplingBatch(**{**checked.__dict__, "plain": True})
    for a, b in zip(sample(logits, checked), sample(logits, plain), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("filtered", [False, True])
def test_all_sampled_batches_draw_exactly_what_the_masked_path_draws(temp, filtered):
    """`all_sampled` (no greedy row) and `unit_temperature` (every T is 1), promised by
    SlotPool, skip the greedy mask, its host sync and the division; same bits out."""
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(5)) * 3
    kw = dict(top_k=7, top_p=0.8) if filtered else {}
    masked = _batch(12, temp=temp, counters=torch.arange(12, dtype=torch.int64), **kw)
    for plain in (False, True) if not filtered else (False,):
        fast = SamplingBatch(
            **{
                **masked.__dict__,
                "plain": plain,
                "all_sampled": True,
                "unit_temperature": temp == 1.0,
            }  # fmt: skip
        )
        for a, b in zip(sample(logits, masked), sample(logits, fast), strict=True):
            assert torch.equal(a, b)
    rows = torch.tensor([1, 4])
    fast = SamplingBatch(**{**masked.__dict__, "all_sampled": True})
    for a, b in zip(
        sample_with_top(logits, masked, rows, 5),
        sample_with_top(logits, fast, rows, 5),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_all_greedy_batches_give_exactly_what_the_sampling_path_gives():
    """sample_greedy (no parameters) against sample() on greedy rows: the same bits, ties
    and non-finite logits included."""
    torch.manual_seed(3)
    logits = torch.randn(6, 50) * 4
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie: the same index as max() takes
    logits[2, 3] = float("inf")
    logits[3, :] = float("-inf")
    for rows in (logits, logits[:1], logits[4:]):
        want = sample(rows, _batch(rows.shape[0], temp=0.0, top_k=2, top_p=0.5))
        got = sample_greedy(rows)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].nan_to_num(), want[1].nan_to_num())
        assert torch.equal(got[1].isnan(), want[1].isnan())
