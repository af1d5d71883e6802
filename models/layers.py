"""Small building blocks of the GLM-4.x decoder: RMSNorm, the SwiGLU MLP and partial RoPE.

RoPE follows HF's GLM-4 MoE convention: only the first `rotary_dim` dims of each head rotate,
with the "rotate half" pairing (dim i with i + rotary_dim/2). It is applied as
`x * cos + (x @ R) * sin` where R is a fixed signed permutation over the whole head, and
cos/sin are 1/0 on the pass-through dims: four tensor ops per q or k, no slicing or concat,
and bit-identical to the slice-rotate-concat formulation (R only moves and negates values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import rms_norm_native, swiglu_native


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; fp32 statistics, output in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if rms_norm_native.usable(x, self.weight):  # fp32 CPU: two C calls, not ~16 ops
            return rms_norm_native.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Match HF in low precision: normalise in fp32, cast, then scale in the input dtype.
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return self.weight * y


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); HF names gate_proj, up_proj, down_proj."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if swiglu_native.usable(gate, up):  # fp32 CPU: one C call each way, not ~7 ops
            return self.down_proj(swiglu_native.swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


@dataclass
class Rope:
    """cos/sin for a set of positions, broadcast over heads: [..., 1, head_dim] each."""

    cos: Tensor
    sin: Tensor
    rotate: Tensor  # [head_dim, head_dim] signed permutation (rotate_half on rotary dims)
    perm: rms_norm_native.SignedPerm | None = None  # rotate as indices (the fused C path)

    def apply(self, x: Tensor) -> Tensor:
        """x [..., heads, head_dim] -> same shape, rotated."""
        return torch.addcmul(x * self.cos, x @ self.rotate, self.sin)


class RotaryEmbedding(nn.Module):
    """Computes `Rope` for given positions (fp32 math like HF, cast to the compute dtype)."""

    def __init__(self, head_dim: int, rotary_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # Plain attributes, not buffers: they are constants of the config, and a model built on
        # the meta device and materialised with to_empty() must not lose them.
        cpu = torch.device("cpu")
        exponents = torch.arange(0, rotary_dim, 2, device=cpu).float() / rotary_dim
        self.inv_freq = 1.0 / (theta**exponents)
        half = rotary_dim // 2
        rotate = torch.zeros(head_dim, head_dim, device=cpu)
        idx = torch.arange(half, device=cpu)
        # (x @ R)[i] = -x[i + half] for i < half; (x @ R)[i + half] = x[i].
        rotate[idx + half, idx] = -1.0
        rotate[idx, idx + half] = 1.0
        self.rotate = rotate
        self.perm = rms_norm_native.signed_perm(rotate)  # for the fused C QK-norm + RoPE

    def forward(self, positions: Tensor, dtype: torch.dtype) -> Rope:
        """positions: int64 [...] -> Rope with cos/sin [..., 1, head_dim] in `dtype`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            self.rotate = self.rotate.to(positions.device)
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # [..., rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        pad = self.head_dim - self.rotary_dim
        cos, sin = emb.cos(), emb.sin()
        if pad:
            cos = F.pad(cos, (0, pad), value=1.0)
            sin = F.pad(sin, (0, pad), value=0.0)
        cos, sin = cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)
        return Rope(cos, sin, self.rotate.to(dtype), self.perm)
