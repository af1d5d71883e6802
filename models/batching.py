"""Per-forward index metadata shared by every layer: packed sequences and KV-cache batches.

Both are computed once per forward (a handful of small int ops) so the layers themselves
stay free of Python loops and per-row work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.attention_paths import AttentionPaths, bucket_area, buckets, build_paths, tree_paths


@dataclass
class TreeLayout:
    """A pack whose rows may be prompt trees: [prompt, completion 1, ..., completion k].

    Each of a tree's k completions continues the shared prompt (positions P, P+1, ...) and
    sees only the prompt and itself: key j is visible to query i iff positions[j] <=
    positions[i] and (branch[j] == 0 or branch[j] == branch[i]). An ordinary row is all
    branch 0 with positions 0..n-1, i.e. plain causal attention. Built by the trainer
    (trainer/prefix_tree.py); every tensor is int64 [T] except cu_rows.

    cu_rows       int64 [R + 1]  row boundaries (a row: one tree or one ordinary sequence)
    positions     int64 [T]      RoPE position of each token within its row's sequence
    branch        int64 [T]      0 = shared prompt / ordinary row, i = completion i of a tree
    predictor     int64 [T]      index of the token whose hidden state predicts token t (the
                                 prompt's last token for a completion's first), -1 = none
    multiplicity  int64 [T]      how many sequences contain token t (k at a tree's prompt)
    """

    cu_rows: Tensor
    positions: Tensor
    branch: Tensor
    predictor: Tensor
    multiplicity: Tensor

    def to(self, device: torch.device | str) -> TreeLayout:
        return TreeLayout(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.cu_rows, self.positions, self.branch, self.predictor, self.multiplicity)


@dataclass
class PackInfo:
    """T tokens of B sequences concatenated (the training layout).

    Attention runs on a right-padded [B, Lmax] view of the pack (packed -> padded by
    `padded_index`), so a causal mask alone keeps every sequence to itself and no [T, T]
    mask is ever built. With a TreeLayout the B rows are its rows and `attn_mask` holds the
    tree visibility on the padded view (one additive SDPA mask, [B, 1, Lmax, Lmax]). When
    the rows' lengths differ so much that padding to Lmax costs over twice the work, `paths`
    runs attention instead as length buckets of causal paths (models/attention_paths.py).
    """

    cu_seqlens: Tensor  # int64 [B + 1], cu_seqlens[0] == 0, cu_seqlens[-1] == T
    positions: Tensor  # int64 [T], restarting at 0 for every sequence (a tree's own positions)
    padded_index: Tensor | None  # int64 [T]: row of token t in the [B * Lmax] padded layout;
    # None when the pack already is the padded layout (all sequences of length Lmax)
    num_seqs: int  # B
    max_len: int  # Lmax
    attn_mask: Tensor | None = None  # float32 [B, 1, Lmax, Lmax], 0 or -inf (tree layouts only)
    paths: AttentionPaths | None = None  # set: attention runs along these paths instead

    @classmethod
    def build(cls, cu_seqlens: Tensor, total: int, layout: TreeLayout | None = None) -> PackInfo:
        """Validate cu_seqlens against the number of tokens and derive the index tensors.
        With a layout, its rows (cu_rows) replace cu_seqlens and its positions are used."""
        if layout is not None:
            return cls._build_tree(layout, total)
        cu, positions, padded, num_seqs, max_len = _padded_rows(cu_seqlens, total)
        if padded is None:  # every sequence Lmax long: no padding at all
            return cls(cu, positions, None, num_seqs, max_len)
        starts = cu.tolist()
        runs = [[(a, z - a)] for a, z in zip(starts[:-1], starts[1:], strict=True)]
        paths = _paths_if_cheaper(runs, total, cu)
        return cls(cu, positions, padded, num_seqs, max_len, paths=paths)

    @classmethod
    def _build_tree(cls, layout: TreeLayout, total: int) -> PackInfo:
        if layout.positions.shape != (total,) or layout.branch.shape != (total,):
            raise ValueError(f"TreeLayout: positions and branch must be int64 [T={total}]")
        cu, _, index, b, length = _padded_rows(layout.cu_rows, total)
        paths = _paths_if_cheaper(tree_paths(cu, layout.branch), total, cu)
        if paths is not None:
            return cls(cu, layout.positions, index, b, length, paths=paths)
        # padding: a position past every real one (invisible to real queries) and branch -1;
        # a padding query still sees itself, so no row of the mask is empty (no NaN)
        pos = layout.positions.new_full((b * length,), length + int(total))
        branch = layout.branch.new_full((b * length,), -1)
        if index is None:
            pos, branch = layout.positions.clone(), layout.branch.clone()
        else:
            pos[index], branch[index] = layout.positions, layout.branch
        pos, branch = pos.view(b, length), branch.view(b, length)
        visible = (pos[:, None, :] <= pos[:, :, None]) & (
            (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
        )
        # additive float mask: SDPA's CPU kernel takes it ~1.5x faster than a bool one
        bias = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, -torch.inf)
        return cls(cu, layout.positions, index, b, length, bias.unsqueeze(1))


def _padded_rows(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor | None, int, int]:
    """(cu, positions, padded_index or None when no row is short, B, Lmax), cu checked."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected int64 [B+1] with B>=1, got {cu_seqlens.shape}")
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths <= 0).any()):
        raise ValueError(
            f"cu_seqlens: expected 0 = c0 < c1 < ... < cB = T = {total}, got {cu.tolist()}"
        )
    num_seqs = lengths.numel()
    max_len = int(lengths.max())
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), lengths)
    positions = torch.arange(total, device=cu.device) - cu[:-1][seq_of]
    padded = None if num_seqs * max_len == total else seq_of * max_len + positions
    return cu, positions, padded, num_seqs, max_len


def _paths_if_cheaper(
    runs: list[list[tuple[int, int]]], total: int, cu: Tensor
) -> AttentionPaths | None:
    """The paths' buckets when the rows padded to Lmax (B * Lmax^2 scores a head) cost over
    twice theirs: below that the gathers eat the gain (the e2e job's short answers: 3-4 %
    slower steps through paths)."""
    lengths = [sum(n for _, n in path) for path in runs]
    groups = buckets(lengths)
    rows = cu.diff()
    if rows.numel() * int(rows.max()) ** 2 <= 2 * bucket_area(lengths, groups):
        return None
    return build_paths(runs, total, groups).to(cu.device)


@dataclass
class CacheBatch:
    """One forward_cached call: B rows of up to L new tokens continuing cached sequences."""

    slots: Tensor  # int64 [B] cache slot of each row
    positions: Tensor  # int64 [B, L] absolute position of each new token
    write_slots: Tensor | None  # int64 [N] slot of each real (non-pad) new token ...
    write_positions: Tensor | None  # int64 [N] ... and its position; None = all B*L are real
    write_rows: Tensor | None  # int64 [N] index of each real token in the flattened [B * L]
    context: int  # keys attended: cache positions [0, context), the max end over rows
    mask: Tensor | None  # bool [B, 1, G * L, context]: key position <= the query's own
    # position, repeated for the G query heads of each KV head (attention runs per KV head on
    # G*L rows); [B, 1, 1, context] when L = 1 (SDPA broadcasts it over the G heads); None for
    # one token (B = L = 1): it sees every key < context, its own position being context - 1
    first_slot: int | None = None  # set when slots are first_slot, first_slot + 1, ...: the
    # cache rows are then a slice (a view), not a gather (the engine keeps slots packed)
    host_slots: list[int] | None = None  # slots as a host list (read once by build)
    host_ends: list[int] | None = None  # start + length of each row, a host list

    @classmethod
    def build(
        cls,
        slots: Tensor | list[int],
        start_pos: Tensor | list[int],
        lengths: Tensor | list[int],
        seq_len: int,
        max_len: int,
        groups: int = 1,
        device: torch.device | str = "cpu",
    ) -> CacheBatch:
        """Validate the row metadata of forward_cached against the cache capacity. The rows
        may come as host lists (the engine's): their checks then read no tensor, and the
        index tensors are built on `device` (ignored for tensors, which stay where they are)."""
        if isinstance(slots, Tensor):
            host_slots, ends, full = _host_rows(slots, start_pos, lengths, seq_len, max_len)
        else:
            host_slots, ends, full = _check_rows(slots, start_pos, lengths, seq_len, max_len)
            slots, start_pos, lengths = _row_tensors(slots, start_pos, lengths, full, device)
        batch = slots.numel()
        context = max(ends)
        first = host_slots[0]
        is_run = all(s == first + i for i, s in enumerate(host_slots))
        first_slot = first if is_run else None
        write: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)
        if seq_len == 1 and batch == 1:  # one token: every cached key is visible, no mask
            positions, mask = start_pos.to(torch.int64).view(1, 1), None
        elif seq_len == 1:  # decode: one query row per KV head group, shared by its G heads
            positions = start_pos.to(torch.int64)[:, None]
            keys = torch.arange(context, device=slots.device)
            mask = (keys <= positions).view(batch, 1, 1, context)
        else:
            steps = torch.arange(seq_len, device=slots.device)
            positions = start_pos[:, None] + steps  # [B, L]
            mask = torch.arange(context, device=slots.device) <= positions[:, :, None]
            if groups > 1:  # [B, L, context] -> [B, G, L, context]
                mask = mask.unsqueeze(1).expand(batch, groups, seq_len, context)
            mask = mask.reshape(batch, 1, groups * seq_len, context)
            if not full:  # the real tokens' cache rows, positions and flat indices
                rows = (steps < lengths[:, None]).reshape(-1).nonzero().squeeze(1)
                write = (slots.repeat_interleave(seq_len)[rows], positions.reshape(-1)[rows], rows)
        return cls(slots, positions, *write, context, mask, first_slot, host_slots, ends)


def _row_tensors(
    slots: list[int],
    start_pos: list[int],
    lengths: list[int],
    full: bool,
    device: torch.device | str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Checked host rows as int64 [B] tensors on `device`; lengths only where some row is
    short of L (build needs them only then)."""
    if len(slots) == 1:  # torch.full is one op, torch.tensor four
        slots_t = torch.full((1,), slots[0], dtype=torch.int64, device=device)
        start_t = torch.full((1,), start_pos[0], dtype=torch.int64, device=device)
    else:
        slots_t = torch.tensor(slots, dtype=torch.int64, device=device)
        start_t = torch.tensor(start_pos, dtype=torch.int64, device=device)
    lengths_t = None if full else torch.tensor(lengths, dtype=torch.int64, device=device)
    return slots_t, start_t, lengths_t


def _host_rows(
    slots: Tensor, start_pos: Tensor, lengths: Tensor, seq_len: int, max_len: int
) -> tuple[list[int], list[int], bool]:
    """(slots, start + length of each row, whether every row has L tokens) as host values,
    checked against L and the cache capacity. One host read (one sync on a GPU) for every
    check, the slot run and the ends models/decode_attention.py plans with: B is at most a
    few hundred rows."""
    if not (start_pos.shape == lengths.shape == slots.shape == (slots.numel(),)):
        raise ValueError(
            "forward_cached: slots, start_pos and lengths must all be int64 [B]; got "
            f"{tuple(slots.shape)}, {tuple(start_pos.shape)}, {tuple(lengths.shape)}"
        )
    host_slots, starts, lens = torch.stack([slots, start_pos, lengths]).tolist()
    return _check_rows(host_slots, starts, lens, seq_len, max_len)


def _check_rows(
    host_slots: list[int], starts: list[int], lens: list[int], seq_len: int, max_len: int
) -> tuple[list[int], list[int], bool]:
    """_host_rows on host lists."""
    if not (len(starts) == len(lens) == len(host_slots) > 0):
        raise ValueError(
            "forward_cached: slots, start_pos and lengths must be [B] each, B >= 1; got "
            f"{len(host_slots)}, {len(starts)}, {len(lens)}"
        )
    ends = [s + n for s, n in zip(starts, lens, strict=True)]
    if min(lens) < 1 or max(lens) > seq_len:
        raise ValueError(f"forward_cached: lengths must be in [1, L={seq_len}]")
    if min(starts) < 0 or max(ends) > max_len:
        raise ValueError(
            f"forward_cached: positions must lie in [0, max_len={max_len}); max end {max(ends)}"
        )
    return host_slots, ends, min(lens) == seq_len
