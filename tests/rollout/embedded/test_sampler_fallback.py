"""rollout/embedded/sampler.py's inverse-CDF fallback: a draw that float rounding lands on a
zero-weight tail token takes the row's most likely token instead (both branches on the CPU)."""

from __future__ import annotations

import torch

from rollout.embedded.sampler import _inverse_cdf


def test_a_draw_past_the_last_nonzero_weight_falls_back_to_the_argmax() -> None:
    weights = torch.tensor([[0.3, 0.7, 0.0], [0.5, 0.25, 0.25]])
    u = torch.tensor([1 - 2**-26, 0.6], dtype=torch.float64)  # row 0: target rounds to 1.0
    assert _inverse_cdf(weights, u).tolist() == [1, 1]


def test_ordinary_draws_pick_by_the_cdf() -> None:
    weights = torch.tensor([[0.3, 0.7, 0.0], [0.5, 0.25, 0.25]])
    u = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert _inverse_cdf(weights, u).tolist() == [0, 2]
