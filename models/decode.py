"""The inference path (forward_cached) as lean functional code over fused weight views.

On a CPU a decode step of a small model is bound by the number of tensor ops and, at batch 1,
by how fast its GEMVs stream the weights. So this path runs on `DecodeWeights`: per layer
q/k/v fused into one matrix, q_norm/k_norm into one [Hq + Hkv, D] weight, gate/up fused, FP8
weights dequantized once, and every matrix stored as [in, out] (`x @ w`). On the CPU that
layout is a contiguous copy: a one-thread GEMV over a [out, in] weight (F.linear) streams
~9 GB/s here, over the same weight stored [in, out] ~20 GB/s (bench/decode_bound.py's
machine, weights out of cache); elsewhere it is a transposed view (no copy). They are
rebuilt automatically whenever a source tensor changed (in-place update, weight load, swap),
which `DecodeWeights.key` detects from each tensor's identity, storage and version counter.

Per layer: 1 norm, 1 qkv matmul, 1 qk-norm, 3 RoPE ops, 1 cache write, 1 cache read,
SDPA on [B, Hkv, G*L, D] (no K/V repeat), o_proj; the MoE sorts (token, expert) pairs by
expert and runs one grouped GEMM pair (as the training path does), except for a single token
on the CPU, which loops over its k experts (no sort, no bincount, no empty groups).
A padded chunk runs every layer on its real tokens only (the right padding is never
computed), and a decode batch whose rows' contexts differ widely attends in segments, each
to its own longest context (models/decode_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.batching import CacheBatch
from models.decode_attention import AttentionPlan, plan_attention, segmented_attention
from models.fp8 import Fp8ExpertBank, Fp8Linear
from models.layers import Rope
from models.moe import ExpertBank, TopkRouter, grouped_swiglu_in_out


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
    experts_gate_up: Tensor | None = None  # [E, H, 2 I]
    experts_down: Tensor | None = None  # [E, I, H]


def _in_out(w: Tensor) -> Tensor:
    """[..., out, in] -> [..., in, out]: a contiguous copy on the CPU (2x the GEMV bandwidth
    there), a view elsewhere (GPU GEMMs take either layout at full speed)."""
    t = w.transpose(-1, -2)
    return t.contiguous() if t.device.type == "cpu" else t


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
    out.experts_gate_up, out.experts_down = _bank(mlp.experts, dtype)
    return out


@dataclass
class DecodeWeights:
    key: tuple
    layers: list[DecodeLayer]
    embed: Tensor  # [V, H]
    norm: Tensor  # [H]
    lm_head: Tensor  # [V, H]

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
        return cls(
            key,
            layers,
            model.model.embed_tokens.weight.detach(),
            model.model.norm.weight.detach(),
            model.lm_head.weight.detach(),
        )


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim; weight [..., D] may also vary over leading dims (heads)."""
    if x.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight, eps)
        return F.rms_norm(x, weight.shape[-1:], None, eps) * weight
    return weight * F.rms_norm(x.float(), weight.shape[-1:], None, eps).to(x.dtype)


def _swiglu(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x [..., H], gate_up [H, 2 I], down [I, H] -> [..., H]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def _attention(
    x: Tensor,
    w: DecodeLayer,
    rope: Rope,
    batch: CacheBatch,
    cache: Tensor,
    shape: tuple,
    eps: float,
    packed: Tensor | None,
    plan: AttentionPlan | None,
) -> Tensor:
    """x [T, H] (normed) -> attention output [T, H]; cache [slots, 2 Hkv, max_len, D].

    T = B * L, or with `packed` (int64 [T], see decode_forward) only the real tokens: their
    queries are scattered into the padded [B, L] layout for SDPA and gathered back after.
    plan: decode rows attend in segments (models/decode_attention.py)."""
    hq, hkv, d = shape
    b, length = batch.positions.shape
    tokens = x.shape[0]
    qkv = x @ w.qkv if w.qkv_bias is None else torch.addmm(w.qkv_bias, x, w.qkv)
    qkv = qkv.view(tokens, hq + 2 * hkv, d)
    qk = qkv[:, : hq + hkv]
    if w.qk_norm is not None:
        qk = _rms(qk, w.qk_norm, eps)
    qk = rope.apply(qk)
    kv = torch.cat([qk[:, hq:], qkv[:, hq + hkv :]], dim=1)  # [T, 2 Hkv, D]
    kv = kv.to(cache.dtype)  # the cache may be stored in another dtype than the compute
    if batch.write_rows is None:
        slots = batch.slots.repeat_interleave(length) if length > 1 else batch.slots
        cache[slots, :, batch.positions.view(-1)] = kv
    else:  # padded rows: packed holds exactly the real tokens (the write rows)
        cache[batch.write_slots, :, batch.write_positions] = kv
    groups = hq // hkv
    q = qk[:, :hq]
    if packed is not None:  # padding queries are zeros; their rows are dropped below
        q = q.new_zeros(b * length, hq, d).index_copy_(0, packed, q)
    q = q.reshape(b, length, hkv, groups, d).permute(0, 2, 3, 1, 4)
    q = q.reshape(b, hkv, groups * length, d)  # q head h = kv * G + g
    if plan is not None:  # decode rows of very different lengths: segments of the batch
        out = segmented_attention(q, cache, plan, hkv)
    else:
        if batch.first_slot is not None:  # a view: no copy of the batch's K and V
            ctx = cache[batch.first_slot : batch.first_slot + b, :, : batch.context]
        else:
            ctx = cache[:, :, : batch.context].index_select(0, batch.slots)  # [B, 2 Hkv, C, D]
        ctx = ctx.to(x.dtype)
        out = F.scaled_dot_product_attention(q, ctx[:, :hkv], ctx[:, hkv:], attn_mask=batch.mask)
    out = out.view(b, hkv, groups, length, d).permute(0, 3, 1, 2, 4).reshape(b * length, hq * d)
    if packed is not None:
        out = out.index_select(0, packed)
    return out @ w.o


def _route(x: Tensor, w: DecodeLayer, ordered: bool) -> tuple[Tensor, Tensor]:
    """The router of models.moe.TopkRouter without autograd bookkeeping: (experts int64
    [N, k], weights fp32 [N, k]); experts ascending per token only when `ordered`."""
    r = w.router
    scores = F.linear(x if x.dtype == torch.float32 else x.float(), w.router_w).sigmoid()
    choice = scores + r.e_score_correction_bias
    if r.n_group > 1:
        choice = r._mask_groups(choice)
    experts = choice.topk(r.top_k, dim=-1).indices
    if ordered:
        experts = experts.sort(dim=-1).values
    weights = scores.gather(1, experts)
    if r.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return experts, (weights * r.scaling if r.scaling != 1.0 else weights)


def _routed_grouped(x: Tensor, w: DecodeLayer, experts: Tensor, weights: Tensor) -> Tensor:
    """Pairs sorted by expert, one grouped GEMM pair, weighted rows added back per token."""
    k = experts.shape[1]
    flat = experts.view(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w.experts_gate_up.shape[0])
    token = order // k if k > 1 else order
    ys = grouped_swiglu_in_out(x.index_select(0, token), w.experts_gate_up, w.experts_down, counts)
    ys = (ys * weights.view(-1)[order].unsqueeze(1)).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


def _routed_one_token(x: Tensor, w: DecodeLayer, experts: Tensor, weights: Tensor) -> Tensor:
    """x [1, H]: one GEMV pair per chosen expert, summed in ascending expert order (the
    order in which the grouped path's index_add adds them)."""
    ids = experts[0].tolist()
    out = None
    for j in sorted(range(len(ids)), key=ids.__getitem__):
        e = ids[j]
        y = (_swiglu(x, w.experts_gate_up[e], w.experts_down[e]) * weights[:, j : j + 1]).to(
            x.dtype
        )
        out = y if out is None else out + y
    return out


def _moe(x: Tensor, w: DecodeLayer, ordered: bool) -> tuple[Tensor, Tensor]:
    """x [N, H] -> (routed + shared output [N, H], experts int64 [N, k])."""
    experts, weights = _route(x, w, ordered)
    if x.shape[0] == 1 and x.device.type == "cpu":  # a host sync is free on the CPU
        out = _routed_one_token(x, w, experts, weights)
    else:
        out = _routed_grouped(x, w, experts, weights)
    if w.gate_up is not None:
        out = out + _swiglu(x, w.gate_up, w.down)
    return out, experts


def _unpack(x: Tensor, packed: Tensor | None, rows: int) -> Tensor:
    """[T, ...] of the real tokens -> [rows, ...] with zeros at the padding rows."""
    if packed is None:
        return x
    return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, packed, x)


def decode_forward(
    model: nn.Module,
    weights: DecodeWeights,
    input_ids: Tensor,
    batch: CacheBatch,
    caches: list[Tensor],
    rope: Rope,
    capture: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """input_ids [B, L] -> (hidden before the final norm [B, L, H], per-MoE-layer experts
    [B L, k], ascending per token when `capture`). Right padding (rows shorter than L) is not
    computed: every layer runs on the real tokens only, and the padding rows of both outputs
    are zeros (a prefill chunk of prompts 16-48 tokens long is a third padding)."""
    c = model.config
    eps = c.rms_norm_eps
    shape = (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    b, length = input_ids.shape
    rows = b * length
    packed = batch.write_rows  # int64 [N] real tokens of the flat [B L]; None: all are real
    ids = input_ids.view(rows) if packed is None else input_ids.view(rows).index_select(0, packed)
    x = F.embedding(ids, weights.embed)  # [T, H]
    rope = Rope(rope.cos.reshape(rows, 1, -1), rope.sin.reshape(rows, 1, -1), rope.rotate)
    if packed is not None:
        rope = Rope(rope.cos.index_select(0, packed), rope.sin.index_select(0, packed), rope.rotate)
    if b == 1 and length == 1:  # one new token: it attends to every cached position
        batch = replace(batch, mask=None)
    else:
        # SDPA turns a bool mask into an additive one on every call: do it once per forward
        # (0 / -inf in the compute dtype, exactly what SDPA would build)
        mask = torch.zeros(batch.mask.shape, dtype=x.dtype, device=x.device)
        batch = replace(batch, mask=mask.masked_fill_(batch.mask.logical_not(), float("-inf")))
    plan = plan_attention(batch, batch.mask)
    routes = []
    for w, cache in zip(weights.layers, caches, strict=True):
        h = _rms(x, w.in_norm, eps)
        x = x + _attention(h, w, rope, batch, cache, shape, eps, packed, plan)
        h = _rms(x, w.post_norm, eps)
        if w.router is None:
            x = x + _swiglu(h, w.gate_up, w.down)
            continue
        out, experts = _moe(h, w, capture)
        routes.append(_unpack(experts, packed, rows))
        x = x + out
    return _unpack(x, packed, rows).view(b, length, -1), routes
