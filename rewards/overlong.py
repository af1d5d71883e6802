"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a length-aware reward term.

With L_max the generation limit, L_cache the buffer and |y| the tokens the policy generated:

    R_length(y) = 0                                  |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
                = -1                                 |y| > L_max

scaled by a penalty factor and added to the reward of every scored sample (error episodes
keep their reward of 0). `shaped_scoring` wraps a RewardFn's `score_group` with it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

from buffer.episode import Episode

REWARD_KEY = "overlong"
"""Episode.rewards entry holding the (scaled) length term."""

ScoreGroup = Callable[[Sequence[Episode]], Awaitable[None]]


def overlong_reward(length: int, max_len: int, buffer_tokens: int, penalty: float = 1.0) -> float:
    """penalty * R_length for a response of `length` generated tokens (see module docstring)."""
    if not 0 < buffer_tokens < max_len:
        raise ValueError(
            f"algorithm.overlong.buffer_tokens: expected 0 < buffer_tokens < max_len={max_len}, "
            f"got {buffer_tokens}"
        )
    expected = max_len - buffer_tokens
    if length <= expected:
        return 0.0
    if length <= max_len:
        return penalty * (expected - length) / buffer_tokens
    return -penalty


def generated_tokens(episode: Episode) -> int:
    """|y|: response tokens the policy generated (loss mask 1; tool output excluded)."""
    return int(episode.loss_mask.sum())


def shaped_scoring(
    score_group: ScoreGroup, max_len: int, buffer_tokens: int, penalty: float
) -> ScoreGroup:
    """score_group followed by adding the overlong term to each non-error episode's reward."""
    overlong_reward(0, max_len, buffer_tokens, penalty)  # validate once, at start-up

    async def score(episodes: Sequence[Episode]) -> None:
        await score_group(episodes)
        for episode in episodes:
            if episode.is_error:
                continue
            term = overlong_reward(generated_tokens(episode), max_len, buffer_tokens, penalty)
            episode.rewards[REWARD_KEY] = term
            episode.reward = math.fsum([episode.reward, term])

    return score
