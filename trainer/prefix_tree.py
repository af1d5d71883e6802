"""Shared prompt prefixes: a group's samples packed as one tree row (trainer.share_prompt_prefix).

The n samples of a GRPO group repeat the same prompt; on the toy job that is ~70 % of the
tokens. A tree row computes the prompt once: [prompt, completion 1, ..., completion k], with
explicit positions (every completion continues at P, P+1, ...), a branch id per token (0 =
the prompt, i = completion i) and a predictor per token (a completion's first token is
predicted by the prompt's last token). `models.batching.TreeLayout` turns that into one
boolean SDPA mask; every other per-token tensor of the micro-batch is gathered from the
unshared layout (`gather_index`), so losses, advantages and metrics see the same numbers.

A group is shared when it has >= 2 episodes with identical non-empty prompt_ids and non-empty
responses; other episodes (e.g. agent episodes whose prompts differ) stay ordinary rows. A
tree larger than the token budget is split into several trees, each with its own prompt copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from buffer.episode import Episode
from configs import JobConfig
from models.batching import TreeLayout
from trainer.losses.advantages import NEEDS_VALUES

log = logging.getLogger(__name__)


def fallback_reason(job: JobConfig) -> str | None:
    """Why trainer.share_prompt_prefix cannot be exact for this job, None when it can."""
    algo = job.algorithm
    if job.trainer.backend != "torch":
        return f"trainer.backend {job.trainer.backend!r} (torch only)"
    if algo.advantage in NEEDS_VALUES:
        return f"algorithm.advantage {algo.advantage!r} needs a critic"
    if algo.moe.aux_loss_coef > 0:
        return "algorithm.moe.aux_loss_coef > 0 (a mean over the computed tokens)"
    if algo.moe.routing_replay == "rollout" and algo.moe.replay_prompt_routing:
        return "algorithm.moe.replay_prompt_routing (prompt experts differ per sequence)"
    return None


def resolve_sharing(job: JobConfig) -> bool:
    """trainer.share_prompt_prefix where exact; logs one line when it falls back."""
    if not job.trainer.share_prompt_prefix:
        return False
    reason = fallback_reason(job)
    if reason is not None:
        log.info("trainer.share_prompt_prefix: unshared rows instead, because of %s", reason)
    return reason is None


@dataclass(frozen=True)
class Row:
    """One row of the model's layout: consecutive episodes, a tree when `shared`."""

    episodes: tuple[int, ...]
    shared: bool
    tokens: int  # tokens the model computes for this row


def _shareable(group: Sequence[Episode]) -> bool:
    first = group[0].prompt_ids
    return (
        len(group) > 1
        and len(first) > 0
        and all(len(e.response_ids) > 0 for e in group)
        and all(np.array_equal(e.prompt_ids, first) for e in group)
    )


def plan_rows(
    episodes: Sequence[Episode], group_ids: Sequence[int], budget: int, share: bool
) -> list[Row]:
    """The step's rows in episode order. With `share`, each shareable group (consecutive
    episodes of one group id) becomes trees of at most `budget` tokens (greedy in order;
    a chunk of one episode is an ordinary row); everything else one row per episode."""
    rows: list[Row] = []
    i = 0
    while i < len(episodes):
        j = i
        while j < len(episodes) and group_ids[j] == group_ids[i]:
            j += 1
        group = episodes[i:j]
        if share and _shareable(group):
            rows += _split_tree(group, i, budget)
        else:
            rows += [Row((k,), False, episodes[k].num_tokens) for k in range(i, j)]
        i = j
    return rows


def _split_tree(group: Sequence[Episode], first: int, budget: int) -> list[Row]:
    prompt = len(group[0].prompt_ids)
    chunks: list[list[int]] = []
    size = budget + 1  # forces a first chunk
    for k, e in enumerate(group):
        r = len(e.response_ids)
        if size + r > budget:
            chunks.append([])
            size = prompt
        chunks[-1].append(first + k)
        size += r
    rows = []
    for chunk in chunks:
        tokens = prompt + sum(len(group[k - first].response_ids) for k in chunk)
        rows.append(Row(tuple(chunk), len(chunk) > 1, tokens))
    return rows


@dataclass
class SharedLayout:
    """The gather from the unshared concatenation of a micro-batch's episodes to its layout.

    gather_index  int64 [T]      position in the unshared [sum num_tokens] arrays of token t
    cu_seqlens    int64 [B + 1]  tokens each sequence owns in the layout (a tree's prompt
                                 belongs to its first sequence)
    layout        TreeLayout
    """

    gather_index: torch.Tensor
    cu_seqlens: torch.Tensor
    layout: TreeLayout


def shared_layout(episodes: Sequence[Episode], rows: Sequence[Row]) -> SharedLayout:
    """The layout of these rows, whose episodes are, in order, the micro-batch's sequences."""
    offsets = np.cumsum([0] + [episodes[i].num_tokens for r in rows for i in r.episodes])
    src, pos, branch, pred, mult, owned, row_lens = [], [], [], [], [], [], []
    seq, start = 0, 0
    for row in rows:
        first = episodes[row.episodes[0]]
        p = len(first.prompt_ids) if row.shared else first.num_tokens
        k = len(row.episodes)
        # the prompt (or the whole ordinary sequence): causal, predictor t - 1
        src.append(np.arange(offsets[seq], offsets[seq] + p))
        pos.append(np.arange(p))
        branch.append(np.zeros(p, np.int64))
        pred.append(np.arange(start - 1, start + p - 1))
        pred[-1][0] = -1
        mult.append(np.full(p, k if row.shared else 1))
        cursor = start + p
        for b, i in enumerate(row.episodes if row.shared else ()):
            r = len(episodes[i].response_ids)
            src.append(np.arange(offsets[seq + b] + p, offsets[seq + b] + p + r))
            pos.append(np.arange(p, p + r))
            branch.append(np.full(r, b + 1, np.int64))
            pred.append(np.concatenate([[start + p - 1], np.arange(cursor, cursor + r - 1)]))
            mult.append(np.ones(r, np.int64))
            owned.append(r + (p if b == 0 else 0))
            cursor += r
        if not row.shared:
            owned.append(p)
        row_lens.append(cursor - start)
        seq += k
        start = cursor

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    layout = TreeLayout(
        cu_rows=torch.from_numpy(np.cumsum([0] + row_lens).astype(np.int64)),
        positions=cat(pos),
        branch=cat(branch),
        predictor=cat(pred),
        multiplicity=cat(mult),
    )
    cu = torch.from_numpy(np.cumsum([0] + owned).astype(np.int64))
    return SharedLayout(cat(src), cu, layout)
