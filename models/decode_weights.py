"""The decode path's weights (models/decode.py): fused [in, out] views of a model's weights.

Per layer q/k/v fused into one matrix, q_norm/k_norm into one [Hq + Hkv, D] weight, gate/up
fused, FP8 weights dequantized once, every matrix [in, out] (`x @ w`): on the CPU contiguous
copies in one huge-page arena in read order (models/decode_arena.py), elsewhere transposed
views. Rebuilt by the model whenever `DecodeWeights.key_of` changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models import decode_arena
from models.fp8 import Fp8ExpertBank, Fp8Linear
from models.layers import Rope, RotaryEmbedding
from models.moe import ExpertBank, TopkRouter

if TYPE_CHECKING:
    from models.batching import CacheBatch


@dataclass
class DecodeLayer:
    """Every matrix is [in, out] (see the module docstring): y = x @ w."""

    in_norm: Tensor  # [H]
    post_norm: Tensor  # [H]
    qkv: Tensor  # [H, (Hq + 2 Hkv) D]
    qkv_bias: Tensor | None
    qk_norm: Tensor | None  # [Hq + Hkv, D]
    o: Tensor  # [Hq D, H]
    gate_up: Tensor | None  # dense MLP or shared experts [H, 2 I]
    down: Tensor | None  # [I, H]
    router: TopkRouter | None = None  # MoE layers: selection semantics and fp32 bias
    router_w: Tensor | None = None  # fp32 [E, H]
    router_bias: list[float] | None = None  # the router's fp32 correction bias [E] (CPU)
    experts: list[tuple[Tensor, Tensor]] | None = None  # (gate_up, down) of each routed
    # expert as views (CPU): the one-token path indexes a list, not the bank
    experts_gate_up: Tensor | None = None  # [E, H, 2 I]
    experts_down: Tensor | None = None  # [E, I, H]
    bank: tuple[Tensor, Tensor] | None = None  # ([E + 1, H, 2 I], [E + 1, I, H]): the routed
    # experts then the shared one, when it has their shape (models/decode_moe.py); the four
    # fields above are views of it


def _in_out(w: Tensor) -> Tensor:
    """[..., out, in] -> [..., in, out] as a view: on the CPU _pack then copies it contiguous
    (2x the GEMV bandwidth there); GPU GEMMs take either layout at full speed."""
    return w.transpose(-1, -2)


def _dense(module: nn.Module, dtype: torch.dtype) -> Tensor:
    if isinstance(module, Fp8Linear):
        return module.dense_weight(dtype)
    return module.weight.detach()


def _bank(bank: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The expert bank as ([E, H, 2 I], [E, I, H])."""
    if isinstance(bank, Fp8ExpertBank):
        gate = bank.dense_expert("gate_proj", slice(None), dtype)
        up = bank.dense_expert("up_proj", slice(None), dtype)
        gate_up, down = (
            torch.cat([gate, up], dim=1),
            bank.dense_expert("down_proj", slice(None), dtype),
        )
    elif isinstance(bank, ExpertBank):
        gate_up, down = bank.gate_up_proj.detach(), bank.down_proj.detach()
    else:
        raise TypeError(f"unexpected expert bank {type(bank).__name__}")
    return _in_out(gate_up), _in_out(down)


def _gate_up(mlp: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """SwiGLU weights as ([H, 2 I] gate columns first, [I, H])."""
    gate_up = torch.cat([_dense(mlp.gate_proj, dtype), _dense(mlp.up_proj, dtype)])
    return _in_out(gate_up), _in_out(_dense(mlp.down_proj, dtype))


def _build_layer(layer: nn.Module, dtype: torch.dtype) -> DecodeLayer:
    attn = layer.self_attn
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv = torch.cat([_dense(p, dtype) for p in projections])
    bias = None
    if attn.q_proj.bias is not None:
        bias = torch.cat([p.bias.detach() for p in projections])
    qk_norm = None
    if attn.use_qk_norm:
        q_w = attn.q_norm.weight.detach().expand(attn.num_heads, -1)
        k_w = attn.k_norm.weight.detach().expand(attn.num_kv_heads, -1)
        qk_norm = torch.cat([q_w, k_w])
    out = DecodeLayer(
        in_norm=layer.input_layernorm.weight.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        qkv=_in_out(qkv),
        qkv_bias=bias,
        qk_norm=qk_norm,
        o=_in_out(_dense(attn.o_proj, dtype)),
        gate_up=None,
        down=None,
    )
    mlp = layer.mlp
    if not layer.is_moe:
        out.gate_up, out.down = _gate_up(mlp, dtype)
        return out
    if mlp.shared_experts is not None:
        out.gate_up, out.down = _gate_up(mlp.shared_experts, dtype)
    out.router = mlp.gate
    out.router_w = mlp.gate.weight.detach().float()
    if out.router_w.device.type == "cpu":
        out.router_bias = mlp.gate.e_score_correction_bias.detach().float().tolist()
    out.experts_gate_up, out.experts_down = _bank(mlp.experts, dtype)
    shared = out.gate_up is not None and out.gate_up.shape == out.experts_gate_up.shape[1:]
    if shared and out.gate_up.device.type == "cpu":  # a GPU gains nothing from a copy
        e = out.experts_gate_up.shape[0]
        gate_up = torch.cat([out.experts_gate_up, out.gate_up[None]])
        down = torch.cat([out.experts_down, out.down[None]])
        out.bank = gate_up, down
        out.experts_gate_up, out.experts_down = gate_up[:e], down[:e]
        out.gate_up, out.down = gate_up[e], down[e]
    return out


@dataclass
class _Norm:
    """Scalar tensors of _rms on the CPU: eps, and each normalised width as a float."""

    eps: Tensor
    width: dict[int, Tensor]
    zero: Tensor  # 0.0, the input of decode_one.rms_one's addcmul


@dataclass
class DecodeWeights:
    key: tuple
    layers: list[DecodeLayer]
    embed: Tensor  # [V, H]
    norm: Tensor  # [H]
    lm_head: Tensor  # [H, V]
    rope_table: Rope | None = None  # cos/sin [P, 1, D] of positions 0..P-1, grown on demand
    norm_const: _Norm | None = None  # the CPU's fp32 RMSNorm (see _rms)
    rotation: tuple | None = None  # (rope's rotate, its decode_batch_native.rotation())

    def rope(self, rotary: RotaryEmbedding, batch: CacheBatch, max_len: int) -> Rope:
        """Rope of the batch's positions int64 [B, L] (each < max_len) gathered from a table
        of every position < max_len: the values of rotary(positions) (elementwise math,
        bit-equal), two gathers a forward instead of ~12 ops; for one token (B = L = 1) two
        slices, cos/sin [1, 1, D]."""
        positions = batch.positions
        table = self.rope_table
        if table is None or table.cos.shape[0] < max_len or table.cos.device != positions.device:
            every = torch.arange(max_len, device=positions.device)
            table = self.rope_table = rotary(every, self.embed.dtype)
        if batch.mask is None:  # one token, at position context - 1
            p = batch.context - 1
            return Rope(table.cos[p : p + 1], table.sin[p : p + 1], table.rotate)
        flat = positions.reshape(-1)
        shape = (*positions.shape, 1, table.cos.shape[-1])
        cos = table.cos.index_select(0, flat).view(shape)
        return Rope(cos, table.sin.index_select(0, flat).view(shape), table.rotate)

    @staticmethod
    def key_of(model: nn.Module) -> tuple:
        """Identity, storage and version of every tensor the weights are built from.

        Walks the module tree directly (a tensor shared by two modules appears twice, which
        is harmless): `model.parameters()` builds name prefixes and a memo set for every
        module, ~5x the cost, and this runs before every forward. Plain loops, no
        generators: ~2x faster again (112 -> 47 us on the toy model)."""
        key = []
        stack = [model]
        while stack:
            module = stack.pop()
            for tensors in (module._parameters, module._buffers):
                for t in tensors.values():
                    if t is not None:
                        key.append((id(t), t.data_ptr(), t._version))
            for m in module._modules.values():
                if m is not None:
                    stack.append(m)
        return tuple(key)

    @classmethod
    def build(cls, model: nn.Module, key: tuple) -> DecodeWeights:
        dtype = model.dtype
        with torch.no_grad():
            layers = [_build_layer(layer, dtype) for layer in model.model.layers]
        embed = model.model.embed_tokens.weight.detach()
        out = cls(
            key,
            layers,
            embed,
            model.model.norm.weight.detach(),
            _in_out(model.lm_head.weight.detach()),
        )
        if embed.device.type == "cpu":
            c = model.config
            widths = {c.hidden_size, c.head_dim}
            eps = torch.tensor(c.rms_norm_eps)
            width = {n: torch.tensor(float(n)) for n in widths}
            out.norm_const = _Norm(eps, width, torch.tensor(0.0))
            with torch.no_grad():
                _pack(out)
        return out


def _pack(weights: DecodeWeights) -> None:
    """Every matrix of `weights` as a contiguous copy in one huge-page arena, in the order a
    decode step reads them (models/decode_arena.py); expert views re-derived from the bank."""
    fields = []
    for w in weights.layers:
        names = ["qkv", "o", "router_w"]
        names += ["bank"] if w.bank is not None else ["experts_gate_up", "experts_down"]
        names += ["gate_up", "down"] if w.bank is None else []
        fields += [(w, n) for n in names if getattr(w, n) is not None]
    flat = []
    for w, n in fields:
        flat += list(w.bank) if n == "bank" else [getattr(w, n)]
    copies = iter(decode_arena.pack([*flat, weights.lm_head]))
    for w, n in fields:
        if n != "bank":
            setattr(w, n, next(copies))
            continue
        gate_up, down = w.bank = next(copies), next(copies)
        e = gate_up.shape[0] - 1
        w.experts_gate_up, w.experts_down = gate_up[:e], down[:e]
        w.gate_up, w.down = gate_up[e], down[e]
    weights.lm_head = next(copies)
    for w in weights.layers:
        if w.experts_gate_up is not None:
            w.experts = list(
                zip(w.experts_gate_up.unbind(0), w.experts_down.unbind(0), strict=True)
            )
