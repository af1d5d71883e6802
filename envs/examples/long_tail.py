"""A toy task whose answer lengths are heavy-tailed, as reasoning traces are in real RL.

The prompt ``"37>41"`` asks to count from 37 up to 41; the answer is ``"37 38 39 40 41"``.
The number of items n is drawn from a lognormal distribution (log n ~ Normal(log median,
sigma), rounded, clipped to [1, max_items]): with the defaults (median 2, sigma 1.1) most
answers hold 1-3 items and about one in a hundred holds 25 or more, so the longest responses
run 10-30 times the median. Each item is about one token of the toy tokenizer, so response
lengths follow the same law. The rule is local (add one, stop at the end number), which a
1.8M-parameter model learns from a short SFT, yet a sample can fail anywhere along a long
answer at temperature 1, so the reward (the share of items right from the start) has room to
rise under RL.

Use it as ``data.task: envs.examples.long_tail:LONG_TAIL`` with the reward
``envs.examples.long_tail:count_reward`` (bench/long_tail.py does).
"""

from __future__ import annotations

import math
import random

from pydantic import Field

from buffer.episode import Episode
from envs.tasks.base import Problem, TaskParams, TaskSpec, label_as_answer
from rewards.protocol import final_text, label


class LongTailParams(TaskParams):
    median: float = Field(2.0, gt=0)
    """Median number of items of an answer."""
    sigma: float = Field(1.1, gt=0, le=3)
    """Standard deviation of log(items): the weight of the tail."""
    max_items: int = Field(40, ge=1, le=400)
    """Items are clipped to this (keeps the longest answer within max_new_tokens)."""
    max_start: int = Field(100, ge=1)
    """The first number is drawn uniformly from [0, max_start)."""


def draw_items(rng: random.Random, params: LongTailParams) -> int:
    """One answer's item count: a rounded lognormal draw clipped to [1, max_items]."""
    n = round(math.exp(rng.gauss(math.log(params.median), params.sigma)))
    return min(max(n, 1), params.max_items)


def sample(rng: random.Random, params: LongTailParams) -> Problem:
    start = rng.randrange(params.max_start)
    end = start + draw_items(rng, params) - 1
    key = f"{start}>{end}"
    return Problem(
        key=key,
        messages=[{"role": "user", "content": key}],
        label=" ".join(str(i) for i in range(start, end + 1)),
        metadata={"start": start, "end": end},
    )


LONG_TAIL = TaskSpec(
    name="long_tail_count",
    description="count from a to b ('37>41' -> '37 38 39 40 41'), b - a + 1 lognormal",
    params=LongTailParams,
    sample=sample,
    demonstrate=label_as_answer,
)


def count_score(text: str, expected: str) -> float:
    """The share of items right from the start: leading items of `text` equal to those of
    `expected`, over the longer of the two lists. 1.0 exactly when the lists are equal;
    stopping early or running on both cost, so a short answer to a long count earns little
    (an exact-match reward taught the policy to answer every prompt with one number)."""
    got, want = text.split(), expected.split()
    right = 0
    for a, b in zip(got, want):
        if a != b:
            break
        right += 1
    return right / max(len(got), len(want), 1)


def count_reward(episode: Episode) -> float:
    """The task's reward plugin (see count_score)."""
    return count_score(final_text(episode), label(episode))
