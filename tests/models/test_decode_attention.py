"""Decode attention in segments (models/decode_attention.py): rows of very different context
lengths in scattered cache slots attend each to its own context, with the logits of the
uncached forward; the plan splits only when it saves work."""

from __future__ import annotations

import torch

from models.batching import CacheBatch
from models.decode_attention import plan_attention
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)


def _plan(slots: list[int], ends: list[int], max_len: int = 256):
    n = len(slots)
    batch = CacheBatch.build(
        torch.tensor(slots), torch.tensor(ends) - 1, torch.ones(n, dtype=torch.long), 1, max_len, 2
    )
    mask = torch.zeros(batch.mask.shape).masked_fill_(batch.mask.logical_not(), float("-inf"))
    return plan_attention(batch, mask)


def test_plan_splits_a_long_tail_and_keeps_even_batches_whole() -> None:
    assert _plan(list(range(8)), [40 + i for i in range(8)]) is None  # even: one SDPA call
    plan = _plan([9, 2, 5, 6, 7, 8, 3, 11], [4, 5, 3, 200, 6, 190, 4, 5])
    assert plan is not None and len(plan.segments) >= 2
    rows = plan.order.tolist()
    assert sorted(rows) == list(range(8)) and plan.inverse[plan.order].tolist() == list(range(8))
    ends = [4, 5, 3, 200, 6, 190, 4, 5]
    covered = []
    for s in plan.segments:
        seg = rows[s.start : s.end]
        covered += seg
        assert s.context == max(ends[i] for i in seg)  # attends no further than its rows
    assert covered == rows and plan.segments[-1].context == 200
    short = plan.segments[0]
    assert short.context <= 6 and short.slots is not None  # slots 9, 2, ... are gathered


def test_segmented_decode_matches_the_uncached_forward() -> None:
    """Prefill 8 sequences (3 to 150 tokens) into scattered slots, then decode one token each
    for a few steps in one batch: every row's logits equal the uncached forward's."""
    model = make_model(seed=24)
    g = torch.Generator().manual_seed(3)
    lengths = [3, 5, 150, 4, 6, 120, 3, 5]
    slots = torch.tensor([9, 2, 5, 6, 7, 8, 3, 11])
    seqs = [torch.randint(1, 128, (n + 3,), generator=g) for n in lengths]
    cache = model.new_kv_cache(12, 160)
    for seq, n, slot in zip(seqs, lengths, slots.tolist(), strict=True):
        model.forward_cached(
            seq[None, :n], torch.tensor([slot]), torch.zeros(1, dtype=torch.long),
            torch.tensor([n]), cache,
        )  # fmt: skip
    ends = [n + 1 for n in lengths]
    plan = _plan(slots.tolist(), ends, 160)
    assert plan is not None and len(plan.segments) >= 2  # this batch runs in segments
    refs = [full_logits(model, s) for s in seqs]
    pos = torch.tensor(lengths)
    for step in range(3):
        ids = torch.stack([s[n + step] for s, n in zip(seqs, lengths, strict=True)])[:, None]
        logits = model.forward_cached(ids, slots, pos, torch.ones(8, dtype=torch.long), cache)
        for i, n in enumerate(lengths):
            want = refs[i][n + step]
            assert (logits[i] - want).abs().max().item() < 1e-5, (step, i)
        pos += 1
