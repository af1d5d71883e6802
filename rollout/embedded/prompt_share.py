"""Fresh sequences with one prompt share one prefill row; the others get its K/V by copy.

A rollout sends the n samples of a prompt as n single-sample requests. The scheduler prefills
each distinct prompt once (the *leader*'s row), then copies the leader's cached positions
into the other samples' slots and hands every sample the leader's last-token logits and, with
routing capture, its experts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from rollout.embedded.sequence import Sequence

Pairs = list[tuple[Sequence, Sequence]]  # (sequence, the one whose prefill row it uses)


def share_key(seq: Sequence) -> tuple | None:
    """Fresh sequences with equal keys can share one prefill row: same tokens, and the same
    need for routing capture (a row captured for one serves every sequence that asks)."""
    if seq.output_ids:
        return None  # a re-prefill after retraction carries its own tokens
    return (seq.routing_start is not None, tuple(seq.prompt_ids))


def pair_with_leaders(seqs: list[Sequence]) -> tuple[Pairs, list[Sequence]]:
    """(each sequence with the one whose prefill row it uses, the distinct leaders)."""
    leaders: dict[tuple, Sequence] = {}
    pairs = []
    for seq in seqs:
        key = share_key(seq)
        pairs.append((seq, seq if key is None else leaders.setdefault(key, seq)))
    return pairs, [s for s, lead in pairs if s is lead]


def share_prefills(
    cache: object,
    pairs: Pairs,
    logits_of: dict[int, Tensor],
    routes_of: dict[int, np.ndarray],
) -> Tensor:
    """After the leaders' prefill (their `cached` set): their K/V copied into the followers'
    slots, the experts recorded; the stacked last-token logits [len(pairs), V] of every
    sequence (`logits_of` / `routes_of` are keyed by id(leader))."""
    followers = [(seq, lead) for seq, lead in pairs if seq is not lead]
    if followers:
        copy_slots(
            cache,
            [lead.slot for _, lead in followers],
            [seq.slot for seq, _ in followers],
            max(lead.cached for _, lead in followers),
        )
    for seq, lead in pairs:
        seq.cached = lead.cached
        if id(lead) in routes_of:
            seq.record_routing(routes_of[id(lead)], 0)
    return torch.stack([logits_of[id(lead)] for _, lead in pairs])


def copy_slots(cache: object, src: list[int], dst: list[int], length: int) -> None:
    """Copy the first `length` cached positions of slot `src[i]` into slot `dst[i]` (the dst
    slots distinct, none of them a source), one indexed copy per cache tensor rather than one
    per pair and tensor (a group of 8 samples is 7 pairs x 2 tensors x layers). `length` is
    the longest source's: a shorter source's positions past its own length are copied too,
    harmless since a slot is never read past its own length.

    Uses `cache.copy_slot` per pair when the cache offers one; otherwise every tensor list
    field of the cache dataclass, whose tensors are [num_slots, *, max_len, D].
    """
    if hasattr(cache, "copy_slot"):
        for s, d in zip(src, dst, strict=True):
            cache.copy_slot(s, d, length)
        return
    fields = [t for f in dataclasses.fields(cache) for t in getattr(cache, f.name)]
    device = fields[0].device
    src_t = torch.tensor(src, dtype=torch.int64, device=device)
    dst_t = torch.tensor(dst, dtype=torch.int64, device=device)
    for t in fields:
        t[dst_t, :, :length] = t[src_t, :, :length]
