"""KL estimators between the policy and a frozen reference, per token (Schulman's k1, k2, k3).

Tokens are sampled from the policy; with log r = ref_logp - logp:
  k1 = -log r = logp - ref_logp              unbiased, high variance, can be negative
  k2 = (log r)^2 / 2                         biased, low variance
  k3 = r - 1 - log r                         unbiased, non-negative, low variance
The log ratio is clamped to [-20, 20] in k3 so exp never overflows.

As a loss: coef * agg(k(logp, ref_logp)) (differentiable in logp). As a reward penalty:
`kl_penalty` gives -coef * k(old_logp, ref_logp) per token, added to the per-token rewards
before the advantage estimator runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KLEstimator = Callable[[Tensor, Tensor], Tensor]
_LOG_RATIO_CLAMP = 20.0


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """float [T]: logp - ref_logp."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """float [T]: (logp - ref_logp)^2 / 2."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """float [T]: exp(ref - logp) - 1 - (ref - logp)."""
    log_r = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(log_r) - 1.0 - log_r


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(
    old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, coef: float, estimator: KLEstimator
) -> Tensor:
    """float [...]: the per-token reward penalty -coef * k(old, ref), 0 where mask is 0."""
    return -coef * estimator(old_logprobs, ref_logprobs).detach() * mask
