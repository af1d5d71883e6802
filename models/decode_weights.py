"""The decode path's weights (models/decode.py): fused [in, out] views of a model's weights.

Per layer q/k/v fused into one matrix, q_norm/k_norm into one [Hq + Hkv, D] weight, gate/up
fused, FP8 weights dequantized once, every matrix [in, out] (`x @ w`): on the CPU contiguous
copies in one huge-page arena in read order (models/decode_arena.py), elsewhere transposed
views. Rebuilt by the model whenever `DecodeWeights.key_of` changes; a weight update, which
writes the model's tensors in place, instead writes the new values into the same tensors and
arena (`DecodeWeights.refresh`, called by the model's decode_weights at the next forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models import decode_arena, decode_bf16
from models.decode_layer_native import PlanSlot
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


# a model weight as the decode path reads it: a view of the parameter, or (FP8) a function
# dequantizing it; a load writes parameters in place, so both stay valid until a key_of
# tensor is replaced (DecodeWeights.refresh)
Source = Tensor | Callable[[], Tensor]


def _value(source: Source) -> Tensor:
    return source if isinstance(source, Tensor) else source()


@dataclass
class _Fused:
    """One decode tensor from model weights: `parts` (model layout) concatenated along `dim`,
    as an [in, out] view when `in_out`, fp32 when `fp32`."""

    parts: list[Source]
    dim: int = 0
    in_out: bool = True
    fp32: bool = False
    sizes: list[int] = field(default_factory=list)  # each part's extent along dim (build)

    def build(self) -> Tensor:
        values = [_value(p) for p in self.parts]
        self.sizes = [v.shape[self.dim] for v in values]
        t = values[0] if len(values) == 1 else torch.cat(values, self.dim)
        t = t.float() if self.fp32 else t
        return _in_out(t) if self.in_out else t

    def copies(self, built: Tensor) -> list[tuple[Tensor, Source]]:
        """(view of `built`, what refresh copies into it) in the [in, out] layout, leaving out
        the parts `built` is a view of (they change with the parameter)."""
        model_layout = _in_out(built) if self.in_out else built
        out, start = [], 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            dst = model_layout.narrow(self.dim, start, size)
            start += size
            if isinstance(part, Tensor) and _aliases(dst, part):
                continue
            if not self.in_out:
                out.append((dst, part))
            elif isinstance(part, Tensor):
                out.append((_in_out(dst), _in_out(part)))
            else:
                out.append((_in_out(dst), lambda part=part: _in_out(part())))
        return out


def _aliases(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _dense(module: nn.Module, dtype: torch.dtype) -> Source:
    if isinstance(module, Fp8Linear):
        return lambda: module.dense_weight(dtype)
    return module.weight.detach()


def _bank(bank: nn.Module, dtype: torch.dtype) -> tuple[_Fused, _Fused]:
    """The expert bank as ([E, H, 2 I], [E, I, H])."""
    if isinstance(bank, Fp8ExpertBank):
        every = slice(None)
        gate_up = [
            lambda: bank.dense_expert("gate_proj", every, dtype),
            lambda: bank.dense_expert("up_proj", every, dtype),
        ]
        return _Fused(gate_up, dim=1), _Fused(
            [lambda: bank.dense_expert("down_proj", every, dtype)]
        )
    if isinstance(bank, ExpertBank):
        return _Fused([bank.gate_up_proj.detach()]), _Fused([bank.down_proj.detach()])
    raise TypeError(f"unexpected expert bank {type(bank).__name__}")


def _gate_up(mlp: nn.Module, dtype: torch.dtype) -> tuple[_Fused, _Fused]:
    """SwiGLU weights as ([H, 2 I] gate columns first, [I, H])."""
    gate_up = _Fused([_dense(mlp.gate_proj, dtype), _dense(mlp.up_proj, dtype)])
    return gate_up, _Fused([_dense(mlp.down_proj, dtype)])


def _attention(attn: nn.Module, dtype: torch.dtype) -> dict[str, _Fused]:
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    out = {
        "qkv": _Fused([_dense(p, dtype) for p in projections]),
        "o": _Fused([_dense(attn.o_proj, dtype)]),
    }
    if attn.q_proj.bias is not None:
        out["qkv_bias"] = _Fused([p.bias.detach() for p in projections], in_out=False)
    if attn.use_qk_norm:
        q_w = attn.q_norm.weight.detach().expand(attn.num_heads, -1)
        k_w = attn.k_norm.weight.detach().expand(attn.num_kv_heads, -1)
        out["qk_norm"] = _Fused([q_w, k_w], in_out=False)
    return out


def _layer_sources(layer: nn.Module, dtype: torch.dtype) -> dict[str, _Fused]:
    """What each DecodeLayer tensor is built from (the norms are the parameters themselves)."""
    out = _attention(layer.self_attn, dtype)
    mlp = layer.mlp
    if not layer.is_moe:
        out["gate_up"], out["down"] = _gate_up(mlp, dtype)
        return out
    if mlp.shared_experts is not None:
        out["gate_up"], out["down"] = _gate_up(mlp.shared_experts, dtype)
    out["router_w"] = _Fused([mlp.gate.weight.detach()], in_out=False, fp32=True)
    out["experts_gate_up"], out["experts_down"] = _bank(mlp.experts, dtype)
    return out


def _build_layer(layer: nn.Module, sources: dict[str, _Fused]) -> DecodeLayer:
    out = DecodeLayer(
        in_norm=layer.input_layernorm.weight.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        qkv=sources["qkv"].build(),
        qkv_bias=sources["qkv_bias"].build() if "qkv_bias" in sources else None,
        qk_norm=sources["qk_norm"].build() if "qk_norm" in sources else None,
        o=sources["o"].build(),
        gate_up=sources["gate_up"].build() if "gate_up" in sources else None,
        down=sources["down"].build() if "down" in sources else None,
    )
    if not layer.is_moe:
        return out
    mlp = layer.mlp
    out.router = mlp.gate
    out.router_w = sources["router_w"].build()
    if out.router_w.device.type == "cpu":
        out.router_bias = mlp.gate.e_score_correction_bias.detach().float().tolist()
    out.experts_gate_up = sources["experts_gate_up"].build()
    out.experts_down = sources["experts_down"].build()
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
    plan: _Refresh | None = None  # what refresh() copies
    half: bool = False  # bf16 weights run with fp32 activations (models/decode_bf16.py)
    layer_plan: PlanSlot = field(default_factory=PlanSlot)  # decode_layer_native.plan()

    def rope(self, rotary: RotaryEmbedding, batch: CacheBatch, max_len: int) -> Rope:
        """Rope of the batch's positions int64 [B, L] (each < max_len) gathered from a table
        of every position < max_len: the values of rotary(positions) (elementwise math,
        bit-equal), two gathers a forward instead of ~12 ops; for one token (B = L = 1) two
        slices, cos/sin [1, 1, D]."""
        positions = batch.positions
        table = self.rope_table
        if table is None or table.cos.shape[0] < max_len or table.cos.device != positions.device:
            every = torch.arange(max_len, device=positions.device)
            dtype = torch.float32 if self.half else self.embed.dtype
            table = self.rope_table = rotary(every, dtype)
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
        layers, sources = [], []
        with torch.no_grad():
            for layer in model.model.layers:
                sources.append(_layer_sources(layer, dtype))
                layers.append(_build_layer(layer, sources[-1]))
        embed = model.model.embed_tokens.weight.detach()
        lm_head = _Fused([model.lm_head.weight.detach()])
        out = cls(key, layers, embed, model.model.norm.weight.detach(), lm_head.build())
        if embed.device.type == "cpu":
            c = model.config
            widths = {c.hidden_size, c.head_dim}
            eps = torch.tensor(c.rms_norm_eps)
            width = {n: torch.tensor(float(n)) for n in widths}
            out.norm_const = _Norm(eps, width, torch.tensor(0.0))
            with torch.no_grad():
                _pack(out)
            out.half = decode_bf16.usable(out)
        copies = lm_head.copies(out.lm_head)
        for w, fused in zip(layers, sources, strict=True):
            for name, f in fused.items():
                copies += f.copies(getattr(w, name))
        biases = [
            (w, w.router.e_score_correction_bias) for w in layers if w.router_bias is not None
        ]
        out.plan = _Refresh(copies, biases)
        return out

    def refresh(self, model: nn.Module, key: tuple | None = None) -> bool:
        """Write the model's weights into these decode weights in place (the same tensors and
        arena, the values build() would give) and take the model's key; False, with nothing
        changed, when a tensor of the model is not the one these were built from (replaced,
        re-allocated: build anew). Cheaper than a build (no allocation, no concatenation)
        and keeps the kernels' checks of this object (models/decode_one_native.py) valid.
        key: key_of(model) when the caller has it."""
        key = self.key_of(model) if key is None else key
        if self.plan is None or len(key) != len(self.key):
            return False
        for new, old in zip(key, self.key):
            if new[0] != old[0] or new[1] != old[1]:
                return False
        with torch.inference_mode():  # a build in a forward made inference tensors
            for dst, src in self.plan.copies:
                dst.copy_(src if isinstance(src, Tensor) else src())
            for w, bias in self.plan.biases:
                w.router_bias = bias.detach().float().tolist()
        self.key = key
        return True


@dataclass
class _Refresh:
    """DecodeWeights.refresh's work: (a tensor of the weights or a view of it, the model weight
    it holds) in the [in, out] layout, and the routers whose fp32 bias is kept as floats."""

    copies: list[tuple[Tensor, Source]]
    biases: list[tuple[DecodeLayer, Tensor]]


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
