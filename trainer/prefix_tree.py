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
from trainer.step_arrays import cumsum0, ranges

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
    if len(group) < 2 or len(first) == 0 or any(len(e.response_ids) == 0 for e in group):
        return False
    if any(len(e.prompt_ids) != len(first) for e in group):
        return False
    prompts = np.concatenate([e.prompt_ids for e in group]).reshape(len(group), len(first))
    return bool((prompts == first).all())  # one comparison for the group


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


def shared_layout(
    prompt_lens: np.ndarray, lengths: np.ndarray, rows: Sequence[Row]
) -> SharedLayout:
    """The layout of these rows, whose episodes are, in order, the micro-batch's sequences.
    prompt_lens, lengths: int64 [n] of the step's episodes (Row.episodes index them).

    Built from segments: a row's prompt (or a whole ordinary sequence) and each completion of
    a tree are runs of consecutive source tokens, positions and predictor t - 1, except at a
    segment's first token (-1 for a prompt, the prompt's last token for a completion)."""
    order = [i for row in rows for i in row.episodes]
    offsets = cumsum0(lengths[order])  # where each sequence starts in the unshared pack
    seg = _Segments()
    owned, row_lens = [], []
    seq, start = 0, 0
    for row in rows:
        first = row.episodes[0]
        k = len(row.episodes)
        p = int(prompt_lens[first]) if row.shared else int(lengths[first])
        seg.add(int(offsets[seq]), p, 0, 0, k if row.shared else 1, -1)
        cursor = start + p
        if not row.shared:
            owned.append(p)
        for b, i in enumerate(row.episodes if row.shared else ()):
            r = int(lengths[i] - prompt_lens[i])
            seg.add(int(offsets[seq + b]) + p, r, p, b + 1, 1, start + p - 1)
            owned.append(r + (p if b == 0 else 0))
            cursor += r
        row_lens.append(cursor - start)
        seq += k
        start = cursor
    src, layout = seg.tensors(row_lens)
    return SharedLayout(src, torch.from_numpy(cumsum0(np.array(owned, np.int64))), layout)


class _Segments:
    """Runs of a layout: source start, length, first position, branch, multiplicity and the
    predictor of the run's first token (the others are predicted by the token before)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int, int, int]] = []

    def add(self, src: int, length: int, pos: int, branch: int, mult: int, pred: int) -> None:
        self.rows.append((src, length, pos, branch, mult, pred))

    def tensors(self, row_lens: list[int]) -> tuple[torch.Tensor, TreeLayout]:
        src, length, pos, branch, mult, pred = np.array(self.rows, np.int64).reshape(-1, 6).T
        starts = cumsum0(length)[:-1]
        predictor = np.arange(-1, int(length.sum()) - 1, dtype=np.int64)
        real = length > 0
        predictor[starts[real]] = pred[real]
        layout = TreeLayout(
            cu_rows=torch.from_numpy(cumsum0(np.array(row_lens, np.int64))),
            positions=torch.from_numpy(ranges(pos, length)),
            branch=torch.from_numpy(np.repeat(branch, length)),
            predictor=torch.from_numpy(predictor),
            multiplicity=torch.from_numpy(np.repeat(mult, length)),
        )
        return torch.from_numpy(ranges(src, length)), layout
