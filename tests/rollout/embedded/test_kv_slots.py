"""SlotPool: the uniforms precomputed at admission are exactly the hash of (seed, counter)."""

from __future__ import annotations

import torch

from rollout.embedded.kv_slots import SlotPool
from rollout.embedded.sampler import hash_uniform
from rollout.types import SamplingParams


def _expected(pool: SlotPool, slots: torch.Tensor) -> torch.Tensor:
    return hash_uniform(pool.seeds[slots], pool.counters[slots])


def test_uniforms_match_the_hash_through_steps_and_readmission():
    pool = SlotPool(object(), num_slots=4, max_len=16)
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8)
    a = pool.acquire(sampled, seed=2**63 + 5, counter=0)  # a seed above int64 wraps
    b = pool.acquire(sampled, seed=12345, counter=3)  # re-admitted after 3 tokens
    g = pool.acquire(SamplingParams(max_new_tokens=6, temperature=0.0), seed=7, counter=0)
    slots = torch.tensor([a, b])
    for _ in range(3):  # b reaches its last counter (5)
        batch = pool.batch(torch.tensor([a, b, g]))
        assert torch.equal(batch.uniforms[:2].double(), _expected(pool, slots))
        pool.advance(torch.tensor([a, b, g]))
    pool.release(b)
    c = pool.acquire(sampled, seed=99, counter=2)  # the freed slot, another sequence
    assert c == b
    batch = pool.batch(torch.tensor([a, c]))
    assert torch.equal(batch.uniforms.double(), _expected(pool, torch.tensor([a, c])))


def test_uniforms_filled_in_chunks_match_the_hash(monkeypatch):
    monkeypatch.setattr("rollout.embedded.kv_slots._FILL_CHUNK", 5)  # several fill calls
    pool = SlotPool(object(), num_slots=3, max_len=8)
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    slots = torch.tensor([pool.acquire(params, seed=s, counter=0) for s in (1, 2, 3)])
    for _ in range(4):
        assert torch.equal(pool.batch(slots).uniforms.double(), _expected(pool, slots))
        pool.advance(slots)


def test_a_slot_taken_again_before_any_batch_gets_its_new_sequence_uniforms():
    pool = SlotPool(object(), num_slots=1, max_len=8)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    slot = pool.acquire(params, seed=10, counter=0)
    pool.release(slot)  # aborted before its first step
    assert pool.acquire(params, seed=20, counter=0) == slot
    slots = torch.tensor([slot])
    for _ in range(6):
        assert torch.equal(pool.batch(slots).uniforms.double(), _expected(pool, slots))
        pool.advance(slots)


def test_batches_are_plain_only_while_no_used_slot_has_a_filter():
    pool = SlotPool(object(), num_slots=4, max_len=16)
    a = pool.acquire(SamplingParams(max_new_tokens=4, temperature=1.0), seed=1, counter=0)
    assert pool.batch(torch.tensor([a])).plain
    for filtered in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)):
        f = pool.acquire(SamplingParams(max_new_tokens=4, **filtered), seed=2, counter=0)
        assert not pool.batch(torch.tensor([a, f])).plain
        pool.release(f)
        assert pool.batch(torch.tensor([a])).plain


def test_batches_promise_no_greedy_row_and_unit_temperature_only_while_true():
    pool = SlotPool(object(), num_slots=4, max_len=16)
    a = pool.acquire(SamplingParams(max_new_tokens=4, temperature=1.0), seed=1, counter=0)
    first = pool.batch(torch.tensor([a]))
    assert first.all_sampled and first.unit_temperature
    for temperature, sampled in ((0.0, False), (0.7, True)):
        t = pool.acquire(SamplingParams(max_new_tokens=4, temperature=temperature), 2, 0)
        both = pool.batch(torch.tensor([a, t]))
        assert both.all_sampled == sampled and not both.unit_temperature
        pool.release(t)
        again = pool.batch(torch.tensor([a]))
        assert again.all_sampled and again.unit_temperature
    pool.acquire(SamplingParams(max_new_tokens=4, temperature=0.0), 3, 0)
    pool.reset()
    b = pool.acquire(SamplingParams(max_new_tokens=4, temperature=1.0), 4, 0)
    assert pool.batch(torch.tensor([b])).all_sampled


def test_all_greedy_holds_only_while_every_used_slot_is_greedy():
    pool = SlotPool(object(), num_slots=3, max_len=8)
    assert pool.all_greedy  # no slot used
    g = pool.acquire(SamplingParams(max_new_tokens=4, temperature=0.0), seed=1, counter=0)
    assert pool.all_greedy
    s = pool.acquire(SamplingParams(max_new_tokens=4, temperature=1.0), seed=2, counter=0)
    assert not pool.all_greedy
    pool.release(s)
    assert pool.all_greedy
    pool.advance([g])  # a host list of one slot: the same counter update as a tensor
    pool.advance(torch.tensor([g]))
    assert int(pool.counters[g]) == 2


def test_unit_rows_batches_carry_the_values_the_gathers_give():
    pool = SlotPool(object(), num_slots=8, max_len=16)
    for seed in range(5):
        pool.acquire(SamplingParams(max_new_tokens=6, min_p=-0.0), seed=seed, counter=0)
    slots = torch.tensor([0, 2, 3, 4])
    batch = pool.batch(slots)
    assert batch.plain and batch.all_sampled and batch.unit_temperature
    for name in ("temperature", "top_p", "top_k", "min_p"):
        got, gathered = getattr(batch, name), getattr(pool, name)[slots]
        assert got.dtype == gathered.dtype and torch.equal(got, gathered), name
    pool.acquire(SamplingParams(max_new_tokens=6, temperature=0.5), seed=9, counter=0)
    assert torch.equal(pool.batch(torch.tensor([0, 5])).temperature, torch.tensor([1.0, 0.5]))
