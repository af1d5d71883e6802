"""Loss aggregations against hand-computed values, and their step-wide denominators."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.registry import lookup

# seq0: tokens 1, 2 (3 masked); seq1: tokens 4, 5, 6; seq2: token 7 masked (no trainable token)
X = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
MASK = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
SEQ = torch.tensor([0, 0, 0, 1, 1, 1, 2])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("token_mean", 18.0 / 5),  # (1 + 2 + 4 + 5 + 6) / 5
        ("seq_mean_token_sum", (3.0 + 15.0) / 2),  # seq2 has no token: not counted
        ("seq_mean_token_mean", (1.5 + 5.0) / 2),
    ],
)
def test_aggregation_hand_computed(name, expected):
    agg = lookup("loss_agg", name)
    assert float(agg.reduce(X, MASK, SEQ, 3)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("name", "count"),
    [("token_mean", 5.0), ("seq_mean_token_sum", 2.0), ("seq_mean_token_mean", 2.0)],
)
def test_micro_batch_shares_sum_to_the_step_value(name, count):
    agg = lookup("loss_agg", name)
    full = agg.reduce(X, MASK, SEQ, 3)
    # split into micro-batch A = seq0, micro-batch B = seq1 + seq2 (seq ids renumbered)
    parts = [
        (slice(0, 3), torch.tensor([0, 0, 0]), 1),
        (slice(3, 7), torch.tensor([0, 0, 0, 1]), 2),
    ]
    denom = sum(agg.count(MASK[s], ids, n) for s, ids, n in parts)
    assert float(denom) == count
    shares = [agg.reduce(X[s], MASK[s], ids, n, denom) for s, ids, n in parts]
    assert float(sum(shares)) == pytest.approx(float(full))
