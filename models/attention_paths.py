"""Training attention as length buckets of causal sequences ("paths"), not one padded pack.

A pack's attention is causal within each sequence, and a prompt tree's completion sees its
prompt and itself, i.e. it is causal over the path [prompt, completion]. Padding every row of
a pack to its longest row (and a tree to all of its completions at once, under a dense mask)
costs B * Lmax^2 per head: on heavy-tailed response lengths one long answer makes every row
pay for it, and a tree pays for all its completions seeing each other's keys only to mask
them. Here each path is gathered into a bucket of paths of similar length and every bucket
runs SDPA with is_causal, which skips the blocks above the diagonal and builds no mask.

A prompt token sits on every path of its tree; each path computes it (it sees only prompt
keys, so every copy is the same) and the first path's copy is its output. Its K and V reach
every path through the gather, whose backward sums their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Paths up to this long share one bucket whatever their lengths: padding them costs less than
# another SDPA call (forward and backward) per layer.
SHORT_PATH = 32


@dataclass
class AttentionPaths:
    """The gather of a pack's T token rows into length buckets of right-padded paths.

    gather     int64 [S]  token row of each of the S bucket slots (T: a zero pad row)
    shapes     (B_b, L_b) of each bucket, in slot order (S = sum of B_b * L_b)
    out_index  int64 [T]  slot whose output token t takes
    """

    gather: Tensor
    shapes: list[tuple[int, int]]
    out_index: Tensor

    def to(self, device: torch.device | str) -> AttentionPaths:
        return AttentionPaths(self.gather.to(device), self.shapes, self.out_index.to(device))


def tree_paths(cu_rows: Tensor, branch: Tensor) -> list[list[tuple[int, int]]]:
    """Each path as its runs of token rows, (start, length): a row whose tokens are all
    branch 0 is one path; a tree row gives [prompt run, completion run] per completion."""
    cu = cu_rows.tolist()
    branches = branch.cpu().numpy()
    paths = []
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        b = branches[start:end]
        if b[-1] == 0:  # an ordinary row (a tree always ends in a completion)
            paths.append([(start, end - start)])
            continue
        cuts = [0, *(np.flatnonzero(np.diff(b)) + 1).tolist(), end - start]
        prompt = (start, cuts[1])
        paths.extend([prompt, (start + a, z - a)] for a, z in zip(cuts[1:-1], cuts[2:]))
    return paths


def buckets(lengths: list[int]) -> list[list[int]]:
    """Path indices in buckets, longest first: a path joins the open bucket while its causal
    area (length^2 / 2) is at least half the bucket's, or the bucket is short."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        top = lengths[out[-1][0]] if out else 0
        if out and (2 * lengths[i] ** 2 >= top**2 or top <= SHORT_PATH):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def bucket_area(lengths: list[int], groups: list[list[int]]) -> int:
    """Attention scores per head the buckets compute (before causal skipping)."""
    return sum(len(g) * lengths[g[0]] ** 2 for g in groups)


def build_paths(
    paths: list[list[tuple[int, int]]], total: int, groups: list[list[int]] | None = None
) -> AttentionPaths:
    """The gather of these paths into `groups` (default: `buckets` of their lengths)."""
    lengths = [sum(n for _, n in runs) for runs in paths]
    groups = buckets(lengths) if groups is None else groups
    shapes = [(len(g), lengths[g[0]]) for g in groups]
    gather = np.full(sum(n * length for n, length in shapes), total, dtype=np.int64)
    out_index = np.full(total, -1, dtype=np.int64)
    slot = 0
    for members, (_, width) in zip(groups, shapes, strict=True):
        for i in members:
            at = slot
            for start, n in paths[i]:
                rows = np.arange(start, start + n)
                gather[at : at + n] = rows
                fresh = out_index[rows] < 0  # a prompt's first path claims it
                out_index[rows[fresh]] = np.arange(at, at + n)[fresh]
                at += n
            slot += width
    if (out_index < 0).any():
        raise ValueError("attention paths: some token rows are on no path")
    return AttentionPaths(torch.from_numpy(gather), shapes, torch.from_numpy(out_index))


def attend_paths(q: Tensor, k: Tensor, v: Tensor, paths: AttentionPaths) -> Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]: causal attention along each path."""
    slots = [_gather(t, paths.gather) for t in (q, k, v)]
    outs, offset = [], 0
    for batch, length in paths.shapes:
        n = batch * length
        qb, kb, vb = (
            t[offset : offset + n].view(batch, length, -1, t.shape[-1]).transpose(1, 2)
            for t in slots
        )
        out = training_sdpa(qb, kb, vb)
        outs.append(out.transpose(1, 2).reshape(n, -1))
        offset += n
    return torch.cat(outs).index_select(0, paths.out_index)


def training_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA of the training forward, [B, H, L, D]: causal, or under an additive mask.

    Under CPU autocast (trainer.dtype bfloat16) it runs in fp32, outside autocast: autocast
    would cast q, k and v to bf16 (q and k leave QK-norm in fp32), and torch's CPU flash
    kernel takes ~4x its fp32 time for the bf16 backward (36M long-tail step, a bucket of 52
    x 28 tokens: 26.5 against 6.0 ms). Attention is a small share of the step's FLOPs, and
    the output goes to o_proj, which autocast casts to bf16 again."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return training_sdpa(q.float(), k.float(), v.float(), mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=True)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x [T, H, D] -> [S, H, D], row T of x (one past the end) reading zeros."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, index)
