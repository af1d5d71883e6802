"""build_step from the step's flat arrays (trainer/step_arrays.py) gives the StepBatch of the
per-episode construction it replaced, tensor for tensor (values and dtypes).

The reference below is that construction (the loop over a micro-batch's episodes and the
loop-built tree layout, as trainer/batch.py and trainer/prefix_tree.py had them), fed the same
rows and bins. Inputs: ragged groups with random masks, logprobs and versions, a group whose
prompts differ, overlong episodes, stale tokens, trees split by a small budget, R3 routing.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from buffer.episode import Episode, EpisodeGroup, FinishReason
from models.batching import TreeLayout
from tests.trainer.toy import arithmetic_groups
from trainer.backend import FINISH_REASONS, PackedBatch
from trainer.batch import (
    _gather_layout,
    _rollout_routing,
    build_rl_step,
    pack_by_tokens,
)
from trainer.prefix_tree import SharedLayout, plan_rows


def _response_mask(e: Episode, version, staleness, truncated: bool) -> np.ndarray:
    """The per-episode statement of the loss-mask rule (what step_arrays does for the step):
    all 0 for an overlong episode with mask_truncated, else 0 on tokens older than
    version - staleness."""
    mask = e.loss_mask.astype(np.float32)
    if truncated and e.finish_reason is FinishReason.LENGTH:
        return np.zeros_like(mask)
    if version is not None and staleness is not None:
        stale = (e.versions >= 0) & (e.versions < version - staleness)
        mask = np.where(stale, 0.0, mask).astype(np.float32)
    return mask


def _ref_unshared(episodes, indices, temperature, version, staleness, truncated, r3) -> PackedBatch:
    ids, mask, logp, versions, seq = [], [], [], [], []
    for b, i in enumerate(indices):
        e = episodes[i]
        p, r = len(e.prompt_ids), len(e.response_ids)
        ids += [e.prompt_ids, e.response_ids]
        mask += [np.zeros(p, np.float32), _response_mask(e, version, staleness, truncated)]
        logp += [np.zeros(p, np.float32), e.rollout_logprobs]
        versions += [np.full(p, -1, np.int64), e.versions.astype(np.int64)]
        seq.append(np.full(p + r, b, np.int64))
    cu = np.concatenate([[0], np.cumsum([episodes[i].num_tokens for i in indices])])
    cu = cu.astype(np.int64)
    loss_mask = torch.from_numpy(np.concatenate(mask))
    routing = _rollout_routing(episodes, indices, False) if r3 else None
    if routing is not None:
        routing[1][torch.from_numpy(cu[:-1])] = False
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu),
        loss_mask=loss_mask,
        rollout_logprobs=torch.from_numpy(np.concatenate(logp).astype(np.float32)),
        advantages=torch.zeros_like(loss_mask),
        versions=torch.from_numpy(np.concatenate(versions)),
        seq_ids=torch.from_numpy(np.concatenate(seq)),
        temperature=temperature,
        sample_index=torch.tensor(indices, dtype=torch.int64),
        prompt_lens=torch.tensor([len(episodes[i].prompt_ids) for i in indices]),
        finish_codes=torch.tensor(
            [FINISH_REASONS.index(episodes[i].finish_reason) for i in indices], dtype=torch.int64
        ),
        policy_version=version,
        routed_experts=routing[0] if routing is not None else None,
        routing_replayed=routing[1] if routing is not None else None,
    )


def _ref_layout(episodes, rows) -> SharedLayout:
    offsets = np.cumsum([0] + [episodes[i].num_tokens for r in rows for i in r.episodes])
    src, pos, branch, pred, mult, owned, row_lens = [], [], [], [], [], [], []
    seq, start = 0, 0
    for row in rows:
        first = episodes[row.episodes[0]]
        p = len(first.prompt_ids) if row.shared else first.num_tokens
        k = len(row.episodes)
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

    def cat(parts):
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    layout = TreeLayout(
        cu_rows=torch.from_numpy(np.cumsum([0] + row_lens).astype(np.int64)),
        positions=cat(pos),
        branch=cat(branch),
        predictor=cat(pred),
        multiplicity=cat(mult),
    )
    return SharedLayout(cat(src), torch.from_numpy(np.cumsum([0] + owned).astype(np.int64)),
                        layout)  # fmt: skip


def _reference(groups, budget, share, version, staleness, truncated, r3) -> list[PackedBatch]:
    episodes = [e for g in groups for e in g.episodes]
    group_ids = [i for i, g in enumerate(groups) for _ in g.episodes]
    rows = plan_rows(episodes, group_ids, budget, share)
    out = []
    for b in pack_by_tokens([r.tokens for r in rows], budget):
        bin_rows = [rows[r] for r in b]
        indices = [i for row in bin_rows for i in row.episodes]
        batch = _ref_unshared(episodes, indices, 1.0, version, staleness, truncated, r3)
        if any(row.shared for row in bin_rows):
            batch = _gather_layout(batch, _ref_layout(episodes, bin_rows))
        out.append(batch)
    return out


def _ragged(groups, rng: np.random.Generator) -> list[EpisodeGroup]:
    """Cut responses, random masks, logprobs, versions 0..3, some overlong episodes, R3 experts;
    one group with differing prompts."""
    out = []
    for gi, g in enumerate(groups):
        episodes = []
        for k, e in enumerate(g.episodes):
            n = int(rng.integers(1, len(e.response_ids) + 1))
            prompt = e.prompt_ids if gi != 1 or k % 2 else e.prompt_ids[:-1]
            mask = (rng.random(n) > 0.2).astype(np.float32)
            versions = rng.integers(0, 4, n)
            finish = FinishReason.LENGTH if rng.random() < 0.3 else FinishReason.STOP
            episode = Episode(prompt, e.response_ids[:n], mask, -rng.random(n), versions,
                              e.reward, finish_reason=finish)  # fmt: skip
            experts = np.sort(np.argsort(rng.random((n, 3, 8)), axis=-1)[..., :2], axis=-1)
            episode.routed_experts = experts.astype(np.uint8)
            episode.routing_start = len(prompt)
            episodes.append(episode)
        out.append(EpisodeGroup(g.prompt_id, episodes))
    return out


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("budget", [4096, 40])
@pytest.mark.parametrize("masks", [(None, None, False), (3, 1, True)])
def test_step_equals_the_per_episode_construction(toy_tokenizer, share, budget, masks):
    groups = _ragged(arithmetic_groups(toy_tokenizer, 4, 5, seed=2), np.random.default_rng(1))
    version, staleness, truncated = masks
    for r3 in (False, True):
        step = build_rl_step(
            groups, micro_batch_tokens=budget, share_prompt_prefix=share, rollout_routing=r3,
            current_version=version, max_staleness=staleness, mask_truncated=truncated,
        )  # fmt: skip
        want = _reference(groups, budget, share, version, staleness, truncated, r3)
        assert len(step.micro_batches) == len(want) and (budget > 100 or len(want) > 1)
        for got, ref in zip(step.micro_batches, want, strict=True):
            for f in fields(PackedBatch):
                a, b = getattr(got, f.name), getattr(ref, f.name)
                if isinstance(b, torch.Tensor):
                    assert a.dtype == b.dtype and torch.equal(a, b), f.name
                elif isinstance(b, TreeLayout):
                    for x, y in zip(a.tensors(), b.tensors(), strict=True):
                        assert x.dtype == y.dtype and torch.equal(x, y), f.name
                else:
                    assert a == b, f.name
        if share:
            assert any(b.layout is not None for b in step.micro_batches)
