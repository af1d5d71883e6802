"""Training attention in length buckets of causal paths (models/attention_paths.py).

Heavy-tailed packs and prompt trees with one long completion: the buckets hold every path
once, a token's output slot reads that token, and the forward and the gradients equal
independent references (each sequence alone; a dense masked softmax of the tree rule).
"""

from __future__ import annotations

import math

import torch

from models.attention_paths import SHORT_PATH, attend_paths, build_paths, tree_paths
from models.batching import PackInfo, TreeLayout
from tests.models.glm_helpers import make_model

torch.set_num_threads(1)

TAIL = (3, 150, 9, 40, 5, 64, 2, 12)  # one long answer among short ones


def _pack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([0] + [s.numel() for s in seqs])
    return torch.cat(seqs), lengths.cumsum(0)


def test_buckets_hold_every_path_once_by_length() -> None:
    starts = [0, *torch.tensor(TAIL).cumsum(0).tolist()]
    paths = build_paths([[(a, z - a)] for a, z in zip(starts[:-1], starts[1:])], starts[-1])
    assert paths.shapes == [(1, 150), (1, 64), (1, 40), (5, 12)]  # longest first
    assert sum(b * n for b, n in paths.shapes) == paths.gather.numel()
    # each token's output slot gathers that very token; pad slots gather row T
    assert torch.equal(paths.gather[paths.out_index], torch.arange(starts[-1]))
    assert int((paths.gather == starts[-1]).sum()) == paths.gather.numel() - starts[-1]
    for (_, width), (_, nxt) in zip(paths.shapes, paths.shapes[1:]):  # why each one opened
        assert width > SHORT_PATH and 2 * nxt**2 < width**2


def test_heavy_tailed_pack_equals_each_sequence_alone() -> None:
    model = make_model(seed=5)
    torch.manual_seed(5)
    seqs = [torch.randint(0, 128, (n,)) for n in TAIL]
    ids, cu = _pack(seqs)
    assert len(PackInfo.build(cu, ids.numel()).paths.shapes) > 1  # the bucketed branch
    packed = model.lm_head(model.forward_packed(ids, cu).hidden)
    loss = packed.logsumexp(-1).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    alone_loss = 0.0
    for i, seq in enumerate(seqs):  # one sequence: no padding, no paths
        alone = model.lm_head(model.forward_packed(seq, torch.tensor([0, seq.numel()])).hidden)
        assert (packed[cu[i] : cu[i + 1]] - alone).abs().max().item() < 1e-5
        alone_loss = alone_loss + alone.logsumexp(-1).sum()
    ref = torch.autograd.grad(alone_loss, list(model.parameters()), allow_unused=True)
    for g, r in zip(grads, ref, strict=True):
        if r is not None:
            assert (g - r).abs().max().item() < 1e-4 * max(1.0, r.abs().max().item())


def _tree(prompt: int, completions: list[int]) -> TreeLayout:
    """One tree row [prompt, completion 1, ...] and an ordinary row of 6 after it."""
    positions = [*range(prompt)]
    branch = [0] * prompt
    for b, n in enumerate(completions, start=1):
        positions += range(prompt, prompt + n)
        branch += [b] * n
    total_tree = len(positions)
    positions += range(6)
    branch += [0] * 6
    t = len(positions)
    return TreeLayout(
        cu_rows=torch.tensor([0, total_tree, t]),
        positions=torch.tensor(positions),
        branch=torch.tensor(branch),
        predictor=torch.arange(-1, t - 1),
        multiplicity=torch.ones(t, dtype=torch.int64),
    )


def _dense_tree_attention(q, k, v, layout: TreeLayout) -> torch.Tensor:
    """The tree rule as a [T, T] mask over the whole pack, softmax by hand."""
    t = q.shape[0]
    row = torch.repeat_interleave(torch.arange(2), layout.cu_rows.diff())
    pos, br = layout.positions, layout.branch
    visible = (
        (row[None, :] == row[:, None])
        & (pos[None, :] <= pos[:, None])
        & ((br[None, :] == 0) | (br[None, :] == br[:, None]))
    )
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, -torch.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, -1)


def test_tree_paths_follow_the_tree_rule_forward_and_backward() -> None:
    layout = _tree(prompt=7, completions=[4, 90, 2, 11, 1])
    t = layout.positions.numel()
    runs = tree_paths(layout.cu_rows, layout.branch)
    assert runs[0] == [(0, 7), (7, 4)] and runs[1] == [(0, 7), (11, 90)] and runs[-1] == [(115, 6)]
    paths = build_paths(runs, t)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    out = attend_paths(q, k, v, paths)
    ref = _dense_tree_attention(q, k, v, layout)
    assert (out - ref).abs().max().item() < 1e-5
    weight = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, refs, strict=True):
        assert (g - r).abs().max().item() < 1e-5


def test_pack_takes_paths_only_where_padding_costs_over_twice() -> None:
    long_tail = PackInfo.build(torch.tensor([0, 115, 121]), 121, _tree(7, [4, 90, 2, 11, 1]))
    assert long_tail.paths is not None and long_tail.attn_mask is None
    short = PackInfo.build(torch.tensor([0, 33, 39]), 39, _tree(7, [4, 9, 2, 11]))
    assert short.paths is None and short.attn_mask is not None  # the tree mask: cheaper here
    even = PackInfo.build(torch.tensor([0, 30, 52, 80]), 80)
    assert even.paths is None and even.padded_index is not None
