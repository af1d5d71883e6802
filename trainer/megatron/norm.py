"""An RMSNorm for megatron layer specs that, unlike megatron's local torch norm, allows
sequence parallelism.

Megatron requires sequence parallelism for MoE with TP > 1, but its local (non-TE) norm
`WrappedTorchNorm` refuses `sequence_parallel`; TENorm and Apex's FusedLayerNorm accept it.
This norm computes exactly what HF's `Glm4MoeRMSNorm` computes (normalise in fp32, cast back,
then scale) and tags its weight with `sequence_parallel`, as TENorm does, so that
`finalize_model_grads` sums its gradient over the TP group when each rank saw only its slice
of the sequence.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = weight * (x / sqrt(mean(x**2, -1) + eps)); x [..., hidden_size], any float dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
