"""DAPO's length handling: the soft overlong punishment against the paper's formula, its
config checks, and the overlong filter masking truncated samples out of the loss."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from buffer.episode import Episode
from configs import AlgorithmConfig
from configs.loader import ConfigError, load_job
from rewards.composite import build_reward_fn
from rewards.overlong import overlong_reward, shaped_scoring
from rewards.registry import RewardSpec
from trainer.batch import build_step
from trainer.step_prep import assign_advantages

PLUGINS = "tests.rewards.sample_plugins"


@pytest.mark.parametrize(
    ("length", "penalty", "expected"),
    [
        # L_max = 20, L_cache = 5: free up to 15, then ((20 - 5) - |y|) / 5, -1 past 20
        (3, 1.0, 0.0),
        (15, 1.0, 0.0),
        (16, 1.0, -0.2),
        (18, 1.0, -0.6),
        (20, 1.0, -1.0),
        (25, 1.0, -1.0),
        (18, 0.5, -0.3),  # scaled by the penalty factor
        (17, 2.0, -0.8),
    ],
)
def test_soft_overlong_punishment_matches_dapo_formula(length, penalty, expected) -> None:
    assert overlong_reward(length, 20, 5, penalty) == pytest.approx(expected, abs=1e-12)


def test_buffer_must_fit_under_the_limit_and_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="algorithm.overlong.buffer_tokens"):
        overlong_reward(3, 20, 20)
    with pytest.raises(ValueError, match="buffer_tokens"):
        AlgorithmConfig(overlong={"buffer_tokens": 0})
    with pytest.raises(ValueError, match="penalty"):
        AlgorithmConfig(overlong={"buffer_tokens": 4, "penalty": -1})
    base = "mode: rl\nname: t\nreward:\n  plugins: [{name: arithmetic}]\n"
    path = tmp_path / "job.yaml"
    path.write_text(
        base + "rollout: {max_new_tokens: 16}\nalgorithm:\n  overlong: {buffer_tokens: 16}\n"
    )
    with pytest.raises(ConfigError, match=r"algorithm.overlong.buffer_tokens: 16 must be below"):
        load_job(path)
    path.write_text(
        base + "rollout: {max_new_tokens: 16}\nalgorithm:\n"
        "  overlong: {buffer_tokens: 4, penalty: 0.5}\n  overlong_filter: true\n"
    )
    job = load_job(path)
    assert (job.algorithm.overlong.buffer_tokens, job.algorithm.overlong.penalty) == (4, 0.5)
    assert job.algorithm.overlong_filter and AlgorithmConfig().overlong is None


def _episode(n: int, finish: str = "stop", reward: float = 0.0, tool_tokens: int = 0) -> Episode:
    mask = np.ones(n + tool_tokens)
    mask[n:] = 0  # tool output at the end: not generated, not counted in |y|
    return Episode(
        prompt_ids=[1, 2, 3],
        response_ids=list(range(4, 4 + n + tool_tokens)),
        loss_mask=mask,
        rollout_logprobs=np.full(n + tool_tokens, -0.5),
        versions=np.zeros(n + tool_tokens),
        reward=reward,
        finish_reason=finish,
        metadata={"response_text": "x" * 4},
    )


def test_shaped_scoring_adds_the_term_to_the_plugin_reward() -> None:
    episodes = [_episode(10), _episode(18, tool_tokens=6), _episode(20, "length"), _episode(19)]
    episodes[3].mark_error("engine failed")
    with build_reward_fn([RewardSpec(f"{PLUGINS}:length_reward", weight=0.5)], 5.0) as fn:
        asyncio.run(shaped_scoring(fn.score_group, 20, 5, 1.0)(episodes))
    # plugin: 0.5 * len("xxxx") = 2.0; |y| = 10 -> 0, 18 (+6 tool tokens) -> -0.6, 20 -> -1
    assert [e.reward for e in episodes[:3]] == pytest.approx([2.0, 1.4, 1.0])
    assert [e.rewards["overlong"] for e in episodes[:3]] == pytest.approx([0.0, -0.6, -1.0])
    assert episodes[3].reward == 0.0 and "overlong" not in episodes[3].rewards


def test_overlong_filter_masks_truncated_samples_out_of_the_loss() -> None:
    rewards = [1.0, 0.0, 0.5, 0.25]
    episodes = [_episode(4, reward=r) for r in rewards]
    episodes[1] = _episode(6, "length", reward=0.0)
    kept = build_step(episodes, [0, 0, 0, 0], micro_batch_tokens=64)
    filtered = build_step(episodes, [0, 0, 0, 0], micro_batch_tokens=64, mask_truncated=True)
    (b_kept,), (b_filt,) = kept.micro_batches, filtered.micro_batches
    truncated = b_filt.seq_ids == 1
    # by hand: 4 + 6 + 4 + 4 response tokens trained without the filter, 12 with it
    assert float(b_kept.loss_mask.sum()) == 18 and float(b_filt.loss_mask.sum()) == 12
    assert float(b_filt.loss_mask[truncated].sum()) == 0
    assert torch.equal(b_filt.loss_mask[~truncated], b_kept.loss_mask[~truncated])
    algo = AlgorithmConfig(advantage="grpo", overlong_filter=True)
    assign_advantages(kept, algo)
    assign_advantages(filtered, algo)
    # the truncated sample still counts in the group's statistics: others' advantages unchanged
    assert float(b_filt.advantages[truncated].abs().sum()) == 0
    assert torch.equal(b_filt.advantages[~truncated], b_kept.advantages[~truncated])
    # by hand: group rewards [1, 0, 0.5, 0.25], mean 0.4375, unbiased std 0.42696...
    std = (sum((r - 0.4375) ** 2 for r in [1.0, 0.0, 0.5, 0.25]) / 3) ** 0.5
    for seq, r in ((0, 1.0), (2, 0.5), (3, 0.25)):
        values = b_filt.advantages[(b_filt.seq_ids == seq) & (b_filt.loss_mask > 0)]
        assert values.numel() == 4
        assert torch.allclose(values, torch.full((4,), (r - 0.4375) / (std + 1e-6)))
