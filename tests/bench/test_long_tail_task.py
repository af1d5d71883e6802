"""The long-tail task of bench/long_tail.py (envs/examples/long_tail.py): rows are what the
prompt asks, item counts are lognormal with a heavy tail, the reward is the share of leading
items right."""

from __future__ import annotations

import numpy as np
import pytest

from envs.examples.long_tail import LONG_TAIL, count_score


def test_rows_count_from_start_to_end_and_are_reproducible():
    rows = LONG_TAIL.make_rows(50, seed=3, split="train")
    assert rows == LONG_TAIL.make_rows(50, seed=3, split="train")
    for row in rows:
        start, end = (int(x) for x in row["messages"][0]["content"].split(">"))
        assert row["label"] == " ".join(str(i) for i in range(start, end + 1))
        assert row["metadata"] == {"split": "train", "start": start, "end": end}


def test_item_counts_are_heavy_tailed():
    rows = LONG_TAIL.make_rows(4000, seed=0, split="train")
    items = np.array([r["metadata"]["end"] - r["metadata"]["start"] + 1 for r in rows])
    p50, p99 = np.percentile(items, [50, 99])
    assert p50 == 2  # the median of the lognormal
    assert 10 * p50 <= p99 <= items.max() <= 40  # a tail 10x+ the median, clipped at max_items
    assert (items <= 3).mean() > 0.6  # most answers are short


def test_reward_is_the_share_of_leading_items_right():
    assert count_score("37 38 39", "37 38 39") == 1.0
    assert count_score(" 37  38 39\n", "37 38 39") == 1.0
    assert count_score("37 38", "37 38 39") == pytest.approx(2 / 3)  # stopped early
    assert count_score("37 38 39 40", "37 38 39") == pytest.approx(3 / 4)  # ran on
    assert count_score("37 39 40", "37 38 39") == pytest.approx(1 / 3)  # wrong from item 2
    assert count_score("", "37") == 0.0


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="sigma"):
        LONG_TAIL.make_rows(1, sigma=-1.0)
