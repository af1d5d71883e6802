"""rollout/embedded/sampler_native.py: the C inverse-CDF draw picks exactly what sampler.py's
torch ops pick, and hands back (None) the rows it cannot vouch for."""

from __future__ import annotations

import pytest
import torch

from rollout.embedded import sampler, sampler_native

pytestmark = pytest.mark.skipif(sampler_native._kernels() is None, reason="no C compiler")


def _torch_pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sampler._inverse_cdf with the kernel switched off."""
    saved = sampler_native.inverse_cdf
    sampler_native.inverse_cdf = lambda w, u: None
    try:
        return sampler._inverse_cdf(weights, u)
    finally:
        sampler_native.inverse_cdf = saved


@pytest.mark.parametrize("rows,vocab", [(64, 512), (13, 100), (5, 7), (1, 1000), (9, 1)])
def test_the_kernel_picks_what_the_torch_ops_pick(rows: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(rows * vocab)
    for trial in range(40):
        z = torch.randn(rows, vocab, generator=g) * (1 + trial % 7)
        weights = (z - z.amax(-1, keepdim=True)).exp_()
        if trial % 3 == 0:  # filtered rows: zeros inside and at the tail
            weights[:, 1::3] = 0.0
        u = torch.rand(rows, generator=g, dtype=torch.float64)
        u[0] = [0.0, 1 - 2**-24][trial % 2]  # the uniforms' ends
        pick = sampler_native.inverse_cdf(weights, u)
        assert pick is not None
        assert torch.equal(pick, _torch_pick(weights, u))


def test_rows_it_cannot_vouch_for_go_back_to_the_torch_ops() -> None:
    u = torch.tensor([1 - 2**-26, 0.6], dtype=torch.float64)
    landing_on_zero = torch.tensor([[0.3, 0.7, 0.0], [0.5, 0.25, 0.25]])  # row 0's target: 1.0
    assert sampler_native.inverse_cdf(landing_on_zero, u) is None
    assert sampler._inverse_cdf(landing_on_zero, u).tolist() == [1, 1]
    for odd in (float("nan"), float("inf"), -0.5):
        weights = torch.tensor([[0.3, odd, 0.2], [0.5, 0.25, 0.25]])
        assert sampler_native.inverse_cdf(weights, u) is None
    assert sampler_native.inverse_cdf(landing_on_zero.T, u) is None  # not contiguous
