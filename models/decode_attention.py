"""Decode attention (one new token per row) over rows of very different context lengths.

One SDPA call over a decode batch attends every row to the longest row's context: the keys
past a row's own end are masked, but still read and computed, and when the rows' cache slots
are not one ascending run (sequences finish and leave holes) those keys are first gathered
(a copy) too. On bench/long_tail_engine.py's workload (lognormal answer lengths, contexts up
to 208) that is 2.4x the row-positions the rows need, and 97 % of them gathered.

`plan_attention` sorts the rows by context end and cuts them into a few segments when the
saved row-positions pay for the extra calls; each segment attends only up to its own longest
row, through a view of the cache when its slots are consecutive, else a gather of just that
many positions. With one segment it is the plain path (same call, same tensors).
On the CPU in fp32, models/decode_batch_native.attend_rows does this instead (each row
reads its own slot and context in C); the segments serve the other devices and dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.batching import CacheBatch

# The cost of one more segment (an SDPA call, a gather, slicing), in row-positions: SDPA on
# this CPU takes ~0.045-0.06 us per row-position (B=64, D=32, cold cache) and ~35 us per call.
SEGMENT_COST = 768
MAX_SEGMENTS = 4


@dataclass
class Segment:
    start: int  # rows [start, end) of the sorted batch
    end: int
    context: int  # keys attended: cache positions [0, context)
    first_slot: int | None  # rows' slots are first_slot, first_slot + 1, ...: a view
    slots: Tensor | None  # int64 [end - start]: gathered otherwise
    mask: Tensor | None = None  # additive [n, 1, G, context]; None: every key is visible


@dataclass
class AttentionPlan:
    order: Tensor | None  # int64 [B]: batch rows sorted by context end; None = batch order
    inverse: Tensor | None  # int64 [B]: sorted position of each batch row
    segments: list[Segment]


def _run_start(slots: list[int]) -> int | None:
    """slots[0] when the slots are one ascending run, else None."""
    first = slots[0]
    return first if all(s == first + i for i, s in enumerate(slots)) else None


def _cost(n: int, context: int, view: bool) -> int:
    return SEGMENT_COST + n * context * (1 if view else 2)  # a gather copies what it attends


def _best_cut(ends: list[int], lo: int, hi: int) -> tuple[int, int]:
    """(cut, saved row-positions) of the one cut of sorted rows [lo, hi) that saves most
    when rows [lo, cut) attend to ends[cut - 1] instead of ends[hi - 1] (both gathered)."""
    best, saved = lo, 0
    top = ends[hi - 1]
    for cut in range(lo + 1, hi):
        gain = 2 * (cut - lo) * (top - ends[cut - 1]) - SEGMENT_COST
        if gain > saved:
            best, saved = cut, gain
    return best, saved


def plan_attention(batch: CacheBatch, mask: Tensor | None) -> AttentionPlan | None:
    """The segments of a decode batch (L = 1, B > 1, on the CPU), or None for the plain call.
    mask: the additive [B, 1, G, context] mask of the forward (sliced per segment)."""
    b, length = batch.positions.shape
    if length != 1 or b == 1 or mask is None or batch.slots.device.type != "cpu":
        return None  # on a GPU the plan's host reads would each be a sync
    ends = batch.host_ends  # L = 1: each row's new position + 1
    if ends is None:
        ends = (batch.positions[:, 0] + 1).tolist()
    plain = _cost(b, batch.context, batch.first_slot is not None)
    if plain <= sum(ends) + 2 * SEGMENT_COST:
        return None  # no split can win: two segments cost at least this much
    slots = batch.slots.tolist() if batch.host_slots is None else batch.host_slots
    order = sorted(range(b), key=ends.__getitem__)
    sorted_ends = [ends[i] for i in order]
    cuts = [0, b]
    saved_total = 0
    while len(cuts) - 1 < MAX_SEGMENTS:  # greedy: the best cut of the costliest segment
        best = max(
            (_best_cut(sorted_ends, lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False)),
            key=lambda cs: cs[1],
        )
        if best[1] <= 0:
            break
        cuts = sorted(cuts + [best[0]])
        saved_total += best[1]
    if len(cuts) == 2:
        return None
    segments = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        rows = order[lo:hi]
        seg_slots = [slots[i] for i in rows]
        first = _run_start(seg_slots)
        segments.append(Segment(lo, hi, sorted_ends[hi - 1], first, None))
        if first is None:
            segments[-1].slots = batch.slots.new_tensor(seg_slots)
    cost = sum(_cost(s.end - s.start, s.context, s.first_slot is not None) for s in segments)
    if cost >= plain:
        return None
    index = batch.slots.new_tensor(order)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(b, device=index.device)
    sorted_mask = mask.index_select(0, index)
    for s in segments:
        if sorted_ends[s.start] < s.context:  # some row sees fewer keys than the segment
            s.mask = sorted_mask[s.start : s.end, :, :, : s.context]
    return AttentionPlan(index, inverse, segments)


def segmented_attention(q: Tensor, cache: Tensor, plan: AttentionPlan, hkv: int) -> Tensor:
    """q [B, Hkv, G, D] (batch order) -> SDPA output [B, Hkv, G, D]: each segment's rows
    against its own context; cache [slots, 2 Hkv, max_len, D]."""
    q = q.index_select(0, plan.order)
    outs = []
    for s in plan.segments:
        if s.first_slot is not None:
            ctx = cache[s.first_slot : s.first_slot + s.end - s.start, :, : s.context]
        else:
            ctx = cache[:, :, : s.context].index_select(0, s.slots)
        if ctx.dtype != q.dtype:
            ctx = ctx.to(q.dtype)
        outs.append(
            F.scaled_dot_product_attention(
                q[s.start : s.end], ctx[:, :hkv], ctx[:, hkv:], attn_mask=s.mask
            )
        )
    return torch.cat(outs).index_select(0, plan.inverse)
