"""Batch building: packing by token budget, per-token alignment, staleness masking, views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from buffer.episode import Episode, EpisodeGroup
from trainer.batch import (
    build_rl_step,
    build_step,
    concat_steps,
    from_padded,
    pack_by_tokens,
    to_padded,
)


def _episode(prompt, response, mask=None, logp=None, versions=None, reward=0.0):
    n = len(response)
    return Episode(
        prompt_ids=prompt,
        response_ids=response,
        loss_mask=mask if mask is not None else [1] * n,
        rollout_logprobs=logp if logp is not None else [-0.5] * n,
        versions=versions if versions is not None else [3] * n,
        reward=reward,
    )


def test_first_fit_decreasing_is_deterministic_and_within_budget():
    lengths = [5, 9, 3, 7, 2, 6, 4]
    bins = pack_by_tokens(lengths, budget=12)
    # FFD: 9 -> bin0 (room 3); 7 -> bin1 (5); 6 -> bin2 (6); 5 -> bin1 (0); 4 -> bin2 (2);
    #      3 -> bin0 (0); 2 -> bin2 (0)
    assert bins == [[1, 2], [0, 3], [4, 5, 6]]
    assert bins == pack_by_tokens(lengths, budget=12)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


def test_sequence_over_budget_names_the_setting():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_by_tokens([4, 20], budget=16)


def test_tokens_are_aligned_per_sequence():
    a = _episode(
        [10, 11],
        [20, 21, 22],
        mask=[1, 0, 1],
        logp=[-0.1, 0.0, -0.3],
        versions=[5, -1, 6],
        reward=1.0,
    )
    b = _episode([12], [23], logp=[-0.7], versions=[6], reward=0.0)
    step = build_step([a, b], [0, 0], micro_batch_tokens=64, temperature=0.7)
    assert len(step.micro_batches) == 1
    mb = step.micro_batches[0]
    assert mb.input_ids.tolist() == [10, 11, 20, 21, 22, 12, 23]
    assert mb.cu_seqlens.tolist() == [0, 5, 7]
    assert mb.seq_ids.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert mb.loss_mask.tolist() == [0, 0, 1, 0, 1, 0, 1]
    torch.testing.assert_close(mb.rollout_logprobs, torch.tensor([0, 0, -0.1, 0.0, -0.3, 0, -0.7]))
    assert mb.versions.tolist() == [-1, -1, 5, -1, 6, -1, 6]
    assert mb.temperature == 0.7
    assert mb.prompt_lens.tolist() == [2, 1] and mb.sample_index.tolist() == [0, 1]
    assert step.rewards.tolist() == [1.0, 0.0] and step.response_lens.tolist() == [3, 1]


def test_stale_tokens_are_masked_when_asked():
    e = _episode([1], [2, 3, 4], versions=[3, 4, 5])
    # current 6, max_staleness 2: versions below 4 are off-policy
    mb = build_step([e], [0], micro_batch_tokens=16, current_version=6, max_staleness=2)
    assert mb.micro_batches[0].loss_mask.tolist() == [0, 0, 1, 1]
    mb = build_step([e], [0], micro_batch_tokens=16)
    assert mb.micro_batches[0].loss_mask.tolist() == [0, 1, 1, 1]


def test_groups_flatten_in_order_and_views_round_trip():
    groups = [
        EpisodeGroup("p0", [_episode([1, 2], [3, 4]), _episode([1, 2], [5])]),
        EpisodeGroup("p1", [_episode([6], [7, 8, 9]), _episode([6], [10, 11])]),
    ]
    step = build_rl_step(groups, micro_batch_tokens=5)
    assert step.group_ids.tolist() == [0, 0, 1, 1]
    assert len(step.micro_batches) > 1
    seen = sorted(int(i) for mb in step.micro_batches for i in mb.sample_index)
    assert seen == [0, 1, 2, 3]
    padded = torch.arange(12, dtype=torch.float32).view(4, 3) + 1
    per_token = from_padded(step.micro_batches, padded)
    back = to_padded(step.micro_batches, per_token, 4, 3)
    valid = torch.arange(3)[None, :] < step.response_lens[:, None]
    torch.testing.assert_close(back, torch.where(valid, padded, torch.zeros_like(padded)))
    for mb, values in zip(step.micro_batches, per_token, strict=True):
        prompt = torch.ones(mb.num_tokens, dtype=torch.bool)
        for b in range(mb.num_seqs):
            start = int(mb.cu_seqlens[b])
            prompt[start + int(mb.prompt_lens[b]) : int(mb.cu_seqlens[b + 1])] = False
        assert torch.all(values[prompt] == 0)


def test_concat_steps_renumbers_sequences_and_groups():
    a = build_step([_episode([1], [2], reward=1.0), _episode([1], [3])], [0, 0],
                   micro_batch_tokens=8)  # fmt: skip
    b = build_step([_episode([4], [5, 6], reward=2.0)], [0], micro_batch_tokens=8)
    both = concat_steps([a, b])
    assert both.rewards.tolist() == [1.0, 0.0, 2.0] and both.group_ids.tolist() == [0, 0, 1]
    assert [mb.sample_index.tolist() for mb in both.micro_batches] == [[0, 1], [2]]
    assert both.micro_batches[0].input_ids is a.micro_batches[0].input_ids
    assert a.micro_batches[0].sample_index.tolist() == [0, 1]  # the inputs are untouched


def test_bad_inputs_name_the_field():
    e = _episode([1], [2])
    with pytest.raises(ValueError, match="group_ids"):
        build_step([e], [0, 1], micro_batch_tokens=8)
    with pytest.raises(ValueError, match="temperature"):
        build_step([e], [0], micro_batch_tokens=8, temperature=0.0)
    assert np.array_equal(e.response_ids, [2])
