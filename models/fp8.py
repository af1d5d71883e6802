"""Blockwise FP8 weights in the HF block-FP8 checkpoint format (DeepSeek-V3, GLM-4.x-FP8, SGLang).

A quantized linear weight [N, K] is stored as `weight` float8_e4m3fn [N, K] plus
`weight_scale_inv` float32 [ceil(N/bn), ceil(K/bk)] with w ~= fp8 * scale_inv per block
(the scale is the block's absmax / 448). Quantized: attention q/k/v/o and every MLP, shared
and routed expert projection. Kept in the model dtype: embeddings, norms, the router
(`mlp.gate`), its bias and lm_head.

Compute: `Fp8Linear` and `Fp8ExpertBank` dequantize per block to the activation dtype and run
a normal matmul ("dequant", the default), or quantize activations per token and K-block and
call torch._scaled_mm once per K-block ("scaled_mm"). On this CPU the dequant kernel is the
faster one (bench/model_decode.py measures both); scaled_mm also adds activation rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.moe import ExpertBank, expert_swiglu

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)

_QUANTIZED_NAME = re.compile(
    r"(^|\.)(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)"
    r"\.weight$"
)


def is_quantized_name(hf_name: str) -> bool:
    """Whether an HF on-disk tensor name is stored as FP8 in a block-FP8 checkpoint."""
    return _QUANTIZED_NAME.search(hf_name) is not None


def fp8_quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """The `quantization_config` entry of config.json for a block-FP8 checkpoint."""
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [int(block[0]), int(block[1])],
    }


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"fp8 block: expected two positive ints (rows, cols), got {block}")
    return int(block[0]), int(block[1])


def _blocked(w: Tensor, block: tuple[int, int]) -> Tensor:
    """[..., N, K] -> fp32 [..., nN, bn, nK, bk], zero-padded to whole blocks."""
    bn, bk = block
    n, k = w.shape[-2:]
    nn_, nk = math.ceil(n / bn), math.ceil(k / bk)
    w = w.float()
    if nn_ * bn != n or nk * bk != k:
        w = F.pad(w, (0, nk * bk - k, 0, nn_ * bn - n))
    return w.view(*w.shape[:-2], nn_, bn, nk, bk)


def quantize_blockwise(w: Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (float8_e4m3fn [..., N, K], fp32 scale_inv [..., ceil(N/bn), ceil(K/bk)]).

    Per block: scale_inv = absmax / 448 (1 for an all-zero block), fp8 = round(w / scale_inv).
    Element error: |w - fp8 * scale_inv| <= 2^-4 |w| + 2^-10 scale_inv (3 mantissa bits,
    subnormal step 2^-9).
    """
    block = _check_block(block)
    if w.dim() < 2:
        raise ValueError(f"quantize_blockwise: expected a [..., N, K] weight, got {w.shape}")
    n, k = w.shape[-2:]
    blocks = _blocked(w, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nN, nK]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(*q.shape[:-4], q.shape[-4] * block[0], q.shape[-2] * block[1])
    return q[..., :n, :k].contiguous(), scale


def dequantize_blockwise(
    w8: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """(fp8 [..., N, K], fp32 [..., nN, nK]) -> [..., N, K] in dtype."""
    block = _check_block(block)
    n, k = w8.shape[-2:]
    expected = (math.ceil(n / block[0]), math.ceil(k / block[1]))
    if tuple(scale_inv.shape[-2:]) != expected:
        raise ValueError(
            f"dequantize_blockwise: weight {tuple(w8.shape)} with block {block} needs "
            f"weight_scale_inv [..., {expected[0]}, {expected[1]}], got {tuple(scale_inv.shape)}"
        )
    blocks = _blocked(w8, block) * scale_inv.float()[..., :, None, :, None]
    w = blocks.view(*blocks.shape[:-4], expected[0] * block[0], expected[1] * block[1])
    return w[..., :n, :k].to(dtype)


def _linear_dequant(
    x: Tensor, w8: Tensor, scale: Tensor, block: tuple[int, int], bias: Tensor | None
) -> Tensor:
    return F.linear(x, dequantize_blockwise(w8, scale, block, x.dtype), bias)


def _linear_scaled_mm(
    x: Tensor, w8: Tensor, scale: Tensor, block: tuple[int, int], bias: Tensor | None
) -> Tensor:
    """Per K-block: activations quantized per token, weights per output channel, then summed."""
    bn, bk = block
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    out = None
    for kb in range(math.ceil(k / bk)):
        xs = x2[:, kb * bk : (kb + 1) * bk]
        amax = xs.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        a8 = (xs * (FP8_MAX / amax)).to(FP8_DTYPE)
        scale_b = scale[:, kb].repeat_interleave(bn)[: w8.shape[0]].unsqueeze(0)
        part = torch._scaled_mm(
            a8,
            w8[:, kb * bk : (kb + 1) * bk].t(),
            scale_a=amax / FP8_MAX,
            scale_b=scale_b.contiguous(),
            out_dtype=torch.float32,
        )
        out = part if out is None else out + part
    out = out.to(x.dtype).view(*lead, -1)
    return out if bias is None else out + bias


FP8_KERNELS: dict[str, Callable[..., Tensor]] = {
    "dequant": _linear_dequant,
    "scaled_mm": _linear_scaled_mm,
}


def _kernel(name: str) -> str:
    if name not in FP8_KERNELS:
        raise ValueError(f"fp8 kernel {name!r}: expected one of {sorted(FP8_KERNELS)}")
    return name


class Fp8Linear(nn.Module):
    """A linear layer with a block-FP8 weight (HF names `weight`, `weight_scale_inv`, `bias`).

    Inference only: the weight is a buffer (no gradient). Quantize after any `.to(dtype)` of
    the model, since module.to(dtype) would cast the float8 buffers too.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block: tuple[int, int] = DEFAULT_BLOCK,
        dtype: torch.dtype = torch.float32,
        kernel: str = "dequant",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = _check_block(block)
        self.kernel = _kernel(kernel)
        nb = (math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1]))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale_inv", torch.ones(nb))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block: tuple[int, int] = DEFAULT_BLOCK, kernel: str = "dequant"
    ) -> Fp8Linear:
        w = linear.weight.detach()
        with torch.device(w.device):
            out = cls(w.shape[1], w.shape[0], linear.bias is not None, block, w.dtype, kernel)
        if w.device.type == "meta":  # shapes only; the values are loaded later
            return out
        out.load_dense(w)
        if linear.bias is not None:
            with torch.no_grad():
                out.bias.copy_(linear.bias.detach())
        return out

    @torch.no_grad()
    def load_dense(self, w: Tensor) -> None:
        """Quantize a dense [N, K] weight into this layer."""
        w8, scale = quantize_blockwise(w, self.block)
        self.load_fp8(w8, scale)

    @torch.no_grad()
    def load_fp8(self, w8: Tensor, scale_inv: Tensor) -> None:
        if w8.shape != self.weight.shape or scale_inv.shape != self.weight_scale_inv.shape:
            raise ValueError(
                f"Fp8Linear: expected weight {tuple(self.weight.shape)} and weight_scale_inv "
                f"{tuple(self.weight_scale_inv.shape)} (block {self.block}), got "
                f"{tuple(w8.shape)} and {tuple(scale_inv.shape)}"
            )
        self.weight.copy_(w8)
        self.weight_scale_inv.copy_(scale_inv)

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize_blockwise(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return FP8_KERNELS[self.kernel](
            x, self.weight, self.weight_scale_inv, self.block, self.bias
        )

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, block={self.block}, kernel={self.kernel}"


class Fp8ExpertBank(nn.Module):
    """ExpertBank with block-FP8 expert weights: buffers `{gate,up,down}_proj` [E, N, K] fp8
    and `{gate,up,down}_proj_scale_inv` [E, nN, nK]; only active experts are dequantized."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, bank: ExpertBank, block: tuple[int, int] = DEFAULT_BLOCK) -> None:
        super().__init__()
        self.num_experts, self.intermediate = bank.num_experts, bank.intermediate
        self.block = _check_block(block)
        self.dtype = bank.gate_up_proj.dtype
        gate_up, down = bank.gate_up_proj.detach(), bank.down_proj.detach()
        dense = {
            "gate_proj": gate_up[:, : self.intermediate],
            "up_proj": gate_up[:, self.intermediate :],
            "down_proj": down,
        }
        for name, w in dense.items():
            w8, scale = quantize_blockwise(w, self.block)
            self.register_buffer(name, w8)
            self.register_buffer(name + "_scale_inv", scale)

    def dense_expert(self, name: str, expert: int | slice, dtype: torch.dtype) -> Tensor:
        """Dequantized `name` weight of one expert ([N, K]) or a slice of them ([e, N, K])."""
        w8 = getattr(self, name)[expert]
        scale = getattr(self, name + "_scale_inv")[expert]
        return dequantize_blockwise(w8, scale, self.block, dtype)

    def forward(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Same contract as ExpertBank.forward: rows of xs sorted by expert."""
        every = slice(None)
        gate_up = torch.cat(
            [
                self.dense_expert("gate_proj", every, xs.dtype),
                self.dense_expert("up_proj", every, xs.dtype),
            ],
            dim=1,
        )
        return expert_swiglu(xs, gate_up, self.dense_expert("down_proj", every, xs.dtype), counts)


def quantize_model_(
    model: nn.Module, block: tuple[int, int] = DEFAULT_BLOCK, kernel: str = "dequant"
) -> nn.Module:
    """Swap every quantized linear (is_quantized_name) and expert bank for its FP8 version."""
    block = _check_block(block)
    _kernel(kernel)
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and is_quantized_name(full + ".weight"):
                replacements.append(
                    (module, child_name, Fp8Linear.from_linear(child, block, kernel))
                )
            elif type(child) is ExpertBank:
                replacements.append((module, child_name, Fp8ExpertBank(child, block)))
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    return model


def is_fp8_model(model: nn.Module) -> bool:
    """Whether quantize_model_ has been applied (any FP8 linear or expert bank inside)."""
    return any(isinstance(m, Fp8Linear | Fp8ExpertBank) for m in model.modules())


def model_fp8_block(model: nn.Module) -> tuple[int, int] | None:
    """The block size of the model's FP8 modules, or None for a plain model."""
    for m in model.modules():
        if isinstance(m, Fp8Linear | Fp8ExpertBank):
            return m.block
    return None
