"""The inference path (forward_cached) as lean functional code over fused weight views.

On a CPU a decode step of a small model is bound by the number of tensor ops and, at batch 1,
by how fast its GEMVs stream the weights. So this path runs on `DecodeWeights`
(models/decode_weights.py): fused matrices stored [in, out] (`x @ w`), on the CPU in one
huge-page arena in read order. A one-row GEMV over a [out, in] weight (F.linear) streams
~9 GB/s here, over the same weight stored [in, out] ~20 GB/s (bench/decode_bound.py's
machine, weights out of cache).

Per layer: 1 norm, 1 qkv matmul, 1 qk-norm, 3 RoPE ops, 1 cache write, 1 cache read,
SDPA on [B, Hkv, G*L, D] (no K/V repeat), o_proj; the MoE sorts (token, expert) pairs by
expert and runs one grouped GEMM pair (as the training path does), the shared expert folded in
for up to 128 tokens (models/decode_moe.py). A single fp32 token on the CPU (batch-1 decode)
runs models/decode_one.py's leaner layer: host-scalar norms, its k experts as GEMV pairs added
into the residual, narrow matrices read once before their GEMV. Per-forward work is done once:
the cache rows the new K/V go to, the additive mask, RoPE gathered from a table. A padded chunk
runs every layer on its real tokens only, and a decode batch whose rows' contexts differ widely
attends in segments, each to its own longest context (models/decode_attention.py). On the CPU in
fp32 two C kernels (models/decode_batch_native.py) replace the op-bound parts of batched work:
every token of a batch (decode rows, and a prefill's tokens, causally) attends straight from its
row's cache slot to its own context (no gather, padding, mask or segments), 2-128 tokens run
their routed and shared experts in one call, and any batch of more than one token does its
qk-norm, RoPE and K/V cache write in one call a layer; a layer with every kernel is one C call
(decode_layer_native). A bf16 model on the CPU (one token too: decode_one is fp32 only) runs
them with fp32 activations, its matmuls in C on bf16 weights (models/decode_bf16.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import decode_batch_native, decode_bf16, decode_layer_native
from models.batching import CacheBatch
from models.decode_attention import AttentionPlan, plan_attention, segmented_attention
from models.decode_moe import FOLD_MAX_TOKENS, moe, shared_columns, swiglu
from models.decode_one import one_token_layers, rms_one, warm
from models.decode_one_native import one_token_at
from models.decode_weights import DecodeLayer, DecodeWeights, _Norm
from models.kv_cache import KVCache
from models.layers import Rope
from models.moe import RoutingCapture

__all__ = ["DecodeLayer", "DecodeWeights", "cached_forward", "decode_forward", "decode_logits"]


def _rms(x: Tensor, weight: Tensor, eps: float, const: _Norm | None = None) -> Tensor:
    """RMSNorm over the last dim; weight [..., D] may also vary over leading dims (heads)."""
    if const is not None and x.dtype == torch.float32:
        # F.rms_norm's own CPU ops, bit-equal: x * rsqrt(sum(x * x) / D + eps) * weight (its
        # mean is a sum and a division there), 6 ops instead of its 7 and their dispatch
        scale = torch.addcdiv(const.eps, (x * x).sum(-1, keepdim=True), const.width[x.shape[-1]])
        return x * scale.rsqrt_() * weight
    if x.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight, eps)
        return F.rms_norm(x, weight.shape[-1:], None, eps) * weight
    return weight * F.rms_norm(x.float(), weight.shape[-1:], None, eps).to(x.dtype)


def _rms_c(x: Tensor, weight: Tensor, eps: float, const: _Norm | None) -> Tensor:
    """_rms of fp32 rows (fp32 or bf16 weight) in C (models/decode_bf16.py)."""
    return decode_bf16.rms(x, weight, eps)


def _attention(
    x: Tensor,
    w: DecodeLayer,
    rope: Rope,
    batch: CacheBatch,
    cache: Tensor,
    shape: tuple,
    eps: float,
    step: _Step,
) -> Tensor:
    """x [T, H] (normed) -> attention output [T, Hq D] before o_proj; cache [slots, 2 Hkv,
    max_len, D].

    T = B * L, or with `step.packed` (int64 [T], see decode_forward) only the real tokens:
    their queries are scattered into the padded [B, L] layout for SDPA and gathered back
    after. step.plan: decode rows attend in segments (models/decode_attention.py)."""
    hq, hkv, d = shape
    b, length = batch.positions.shape
    tokens = x.shape[0]
    packed = step.packed
    if step.half or (step.native is not None and w.qkv_bias is None):  # C (decode_bf16.py)
        qkv = decode_bf16.matmul(x, w.qkv)
    else:
        qkv = x @ w.qkv if w.qkv_bias is None else torch.addmm(w.qkv_bias, x, w.qkv)
    qkv = qkv.view(tokens, hq + 2 * hkv, d)
    if step.rope is not None:  # qk-norm, RoPE and the K/V write in one C call
        heads = (hq, hkv)
        norm = w.qk_norm if w.qk_norm is None or not step.half else w.qk_norm.float()
        q = decode_batch_native.qkv_rows(qkv, heads, norm, eps, step.rope, cache, step.write_index)
    else:
        q = _qkv_torch(qkv, w, rope, batch, cache, eps, step)
    if step.native is not None:  # decode rows in C, straight from the cache
        return decode_batch_native.attend_rows(q, cache, *step.native)
    groups = hq // hkv
    if length == 1:  # decode: [B, Hq, D] is [B, Hkv, G, D] as a view (q head h = kv * G + g)
        q = q.view(b, hkv, groups, d)
    else:
        if packed is not None:  # padding queries are zeros; their rows are dropped below
            q = q.new_zeros(b * length, hq, d).index_copy_(0, packed, q)
        q = q.reshape(b, length, hkv, groups, d).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, hkv, groups * length, d)
    if step.plan is not None:  # decode rows of very different lengths: segments of the batch
        out = segmented_attention(q, cache, step.plan, hkv)
    else:
        if batch.first_slot is not None:  # a view: no copy of the batch's K and V
            ctx = cache[batch.first_slot : batch.first_slot + b, :, : batch.context]
        else:
            ctx = cache[:, :, : batch.context].index_select(0, batch.slots)  # [B, 2 Hkv, C, D]
        if ctx.dtype != x.dtype:
            ctx = ctx.to(x.dtype)
        k, v = ctx.split(hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask)
    if length == 1:
        return out.reshape(b, hq * d)
    out = out.view(b, hkv, groups, length, d).permute(0, 3, 1, 2, 4).reshape(b * length, hq * d)
    if packed is not None:
        out = out.index_select(0, packed)
    return out


def _qkv_torch(qkv: Tensor, w: DecodeLayer, rope: Rope, batch: CacheBatch, cache: Tensor,
               eps: float, step: _Step) -> Tensor:  # fmt: skip
    """qkv [T, Hq + 2 Hkv, D] -> q [T, Hq, D] after qk-norm and RoPE; k (likewise) and v
    written to the cache rows of the new tokens."""
    hkv, d = cache.shape[1] // 2, cache.shape[-1]
    hq = qkv.shape[1] - 2 * hkv
    length = batch.positions.shape[1]
    qk, v = qkv.split([hq + hkv, hkv], dim=1)
    if w.qk_norm is not None:
        qk = _rms(qk, w.qk_norm, eps, step.norm)
    q, k = rope.apply(qk).split([hq, hkv], dim=1)
    kv = torch.cat([k, v], dim=1)  # [T, 2 Hkv, D]
    if kv.dtype != cache.dtype:  # the cache may be stored in another dtype than the compute
        kv = kv.to(cache.dtype)
    if step.write_index is not None:  # one index_copy_ over (token, head) rows of the cache
        cache.view(-1, d).index_copy_(0, step.write_index, kv.view(-1, d))
    elif batch.write_rows is None:
        slots = batch.slots.repeat_interleave(length) if length > 1 else batch.slots
        cache[slots, :, batch.positions.view(-1)] = kv
    else:  # padded rows: packed holds exactly the real tokens (the write rows)
        cache[batch.write_slots, :, batch.write_positions] = kv
    return q


def _unpack(x: Tensor, packed: Tensor | None, rows: int) -> Tensor:
    """[T, ...] of the real tokens -> [rows, ...] with zeros at the padding rows."""
    if packed is None:
        return x
    return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, packed, x)


@dataclass
class _Step:
    """What every layer of one forward shares, computed once by decode_forward."""

    packed: Tensor | None  # int64 [T] real tokens of the flat [B L]; None: all are real
    write_index: Tensor | None  # int64 [T 2 Hkv]: rows of cache.view(-1, D) the new K, V go to
    mask: Tensor | None  # additive [B, 1, G L or 1, context]; None: every key is visible
    plan: AttentionPlan | None  # decode rows attending in segments
    norm: _Norm | None  # DecodeWeights.norm_const
    half: bool = False  # bf16 weights, fp32 activations: models/decode_bf16.py's matmuls
    native: tuple[Tensor, Tensor, Tensor] | None = None  # decode rows in C: slots, ends
    # int64 [B] and the kernel's scratch (decode_batch_native.attend_rows); no mask, no plan
    rope: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # cos, sin [T, D] and the
    # rotation of decode_batch_native.qkv_rows (CPU batches of 2+ tokens, or 1 in bf16)


def _write_index(batch: CacheBatch, caches: list[Tensor], length: int) -> Tensor | None:
    """Row (slot, head, position) of every new token's K and V heads in a layer's cache
    viewed as [slots * 2 Hkv * max_len, D]: one index_copy_ per layer writes them all
    (advanced-index assignment with a slice between the indices costs ~10x more). None when
    a cache is not contiguous (then the layers index it directly)."""
    if not all(c.is_contiguous() for c in caches):
        return None
    _, heads, max_len, _ = caches[0].shape
    if batch.host_ends is not None and batch.positions.numel() == 1:  # one token: one op
        first = (batch.host_slots[0] * heads * max_len) + batch.host_ends[0] - 1
        return torch.arange(first, first + heads * max_len, max_len, device=batch.slots.device)
    if batch.write_rows is None:
        slots = batch.slots.repeat_interleave(length) if length > 1 else batch.slots
        positions = batch.positions.view(-1)
    else:
        slots, positions = batch.write_slots, batch.write_positions
    head = torch.arange(heads, device=slots.device)
    rows = slots.to(torch.int64)[:, None] * heads + head
    return (rows * max_len + positions[:, None]).view(-1)


def _token_rows(batch: CacheBatch, length: int) -> tuple[Tensor, Tensor]:
    """(slot, position + 1) int64 [T] of every real new token, contiguous: a prefill's
    tokens attend causally within the prompt as decode rows do, since the layer writes all
    their K/V to the cache before attending (keys [0, position] of the slot = the mask)."""
    if length == 1:
        return batch.slots.contiguous(), batch.positions.view(-1) + 1
    if batch.write_rows is not None:  # padded rows: just the real tokens
        return batch.write_slots.contiguous(), batch.write_positions + 1
    return batch.slots.repeat_interleave(length), batch.positions.reshape(-1) + 1


def _prepare(
    x: Tensor,
    weights: DecodeWeights,
    batch: CacheBatch,
    caches: list[Tensor],
    rope: Rope,
    packed: Tensor | None,
    d: int,
) -> _Step:
    """What every layer of a forward over x [T, H] shares (_Step): the cache write rows,
    and either the C kernels' inputs or the additive mask and segment plan."""
    b, length = batch.positions.shape
    step = _Step(packed, _write_index(batch, caches, length), None, None, weights.norm_const)
    rows_ok = x.shape[0] > 1 or weights.half  # one fp32 token: decode_one; bf16: these
    native = rows_ok and decode_batch_native.attention_usable(x, caches, d)
    if native and step.write_index is not None and step.norm is not None:
        rotation = decode_batch_native.cached_rotation(weights, rope.rotate)
        if rotation is not None:
            cos, sin = (t.reshape(-1, d).float().contiguous() for t in (rope.cos, rope.sin))
            step.rope = (cos, sin, *rotation)
    if native:  # every token attends in C to its own slot's keys up to its position
        padded = (batch.context + 15) // 16 * 16
        scratch = x.new_empty(decode_batch_native.ATTEND_GROUP * padded)
        step.native = (*_token_rows(batch, length), scratch)
    elif b > 1 or length > 1:
        # SDPA turns a bool mask into an additive one on every call: do it once per forward
        # (0 / -inf in the compute dtype, exactly what SDPA would build)
        if x.dtype == torch.get_default_dtype():  # one op: where's scalars take that dtype
            step.mask = torch.where(batch.mask, 0.0, float("-inf"))
        else:
            mask = torch.zeros(batch.mask.shape, dtype=x.dtype, device=x.device)
            step.mask = mask.masked_fill_(batch.mask.logical_not(), float("-inf"))
        step.plan = plan_attention(batch, step.mask)
    return step


def _real_tokens(
    weights: DecodeWeights, ids: Tensor, rope: Rope, packed: Tensor | None
) -> tuple[Tensor, Rope]:
    """The embeddings [T, H] (fp32 for bf16 weights) and RoPE [T, 1, D] of the real tokens of
    the flat ids [B L] (`packed`: their indices; None: all are real)."""
    rows = ids.shape[0]
    if packed is not None:
        ids = ids.index_select(0, packed)
    x = F.embedding(ids, weights.embed)
    if weights.half:
        x = x.float()
    if rope.cos.dim() != 3:  # [B, L, 1, D] -> [T, 1, D] (one token's comes as [1, 1, D])
        rope = Rope(rope.cos.reshape(rows, 1, -1), rope.sin.reshape(rows, 1, -1), rope.rotate)
    if packed is not None:
        rope = Rope(rope.cos.index_select(0, packed), rope.sin.index_select(0, packed), rope.rotate)
    return x, rope


def decode_forward(
    model: nn.Module,
    weights: DecodeWeights,
    input_ids: Tensor,
    batch: CacheBatch,
    caches: list[Tensor],
    rope: Rope,
    capture: bool = False,
    last: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """input_ids [B, L] -> (hidden before the final norm [B, L, H], per-MoE-layer experts
    [B L, k], ascending per token when `capture`). Right padding (rows shorter than L) is not
    computed: every layer runs on the real tokens only, and the padding rows of both outputs
    are zeros (a prefill chunk of prompts 16-48 tokens long is a third padding). `last`
    (int64 [B], see _last_tokens): the hidden of just these real tokens, [B, H], instead."""
    c = model.config
    eps = c.rms_norm_eps
    shape = (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    b, length = input_ids.shape
    rows = b * length
    packed = batch.write_rows  # int64 [N] real tokens of the flat [B L]; None: all are real
    half = weights.half
    x, rope = _real_tokens(weights, input_ids.view(rows), rope, packed)
    norm_const = weights.norm_const
    step = _prepare(x, weights, batch, caches, rope, packed, shape[2])
    step.half = half
    if rows == 1 and norm_const is not None and x.dtype == torch.float32 and not half:

        def attend(h: Tensor, w: DecodeLayer, cache: Tensor) -> Tensor:
            return _attention(h, w, rope, batch, cache, shape, eps, step)

        at = one_token_at(rope, batch)
        routes = one_token_layers(x, weights, caches, eps, capture, attend, at)
        return x.view(1, 1, -1), routes
    routes = decode_layer_native.run(weights, c, x, caches, step, eps, shape, capture)
    if routes is None:  # op by op (the fused call's kernels, or torch where one does not fit)
        routes = _layer_ops(x, weights, caches, rope, batch, step, eps, shape, capture)
    routes = [_unpack(e, packed, rows) for e in routes]  # [B L, k] each (capture)
    if last is not None:  # a copy of just these rows, not the padded [B L, H] first
        return x.index_select(0, last), routes
    return _unpack(x, packed, rows).view(b, length, -1), routes


def _layer_ops(x: Tensor, weights: DecodeWeights, caches: list[Tensor], rope: Rope,
               batch: CacheBatch, step: _Step, eps: float, shape: tuple,
               capture: bool) -> list[Tensor]:  # fmt: skip
    """decode_forward's layers over x [T, H] in place, op by op; MoE experts [T, k] (capture)."""
    routes = []
    half = step.half
    norm = step.norm
    shared = None  # the shared expert's choice columns, the same for every MoE layer
    native_mlp = step.native is not None  # fp32 on the CPU with the kernels built
    rms = _rms_c if half or (native_mlp and decode_bf16.vector_kernels_usable(x)) else _rms
    for w, cache in zip(weights.layers, caches, strict=True):
        h = rms(x, w.in_norm, eps, norm)
        a = _attention(h, w, rope, batch, cache, shape, eps, step)
        x = x.add_(decode_bf16.matmul(a, w.o) if half or native_mlp else a @ w.o)  # x: ours
        h = rms(x, w.post_norm, eps, norm)
        if w.router is None:
            if half or (native_mlp and decode_bf16.mlp_usable(h, w.gate_up)):
                decode_bf16.mlp_into(x, h, w.gate_up, w.down)
            else:
                x.add_(swiglu(h, w.gate_up, w.down))
            continue
        if shared is None and w.bank is not None and 1 < x.shape[0] <= FOLD_MAX_TOKENS:
            shared = shared_columns(w, x.shape[0], x.device)
        out, experts = moe(h, w, capture, shared)
        if capture:
            routes.append(experts)
        x.add_(out)
    return routes


def cached_forward(
    model: nn.Module,
    input_ids: Tensor,
    slots: Tensor | list[int],
    start_pos: Tensor | list[int],
    lengths: Tensor | list[int],
    cache: KVCache,
    all_logits: bool,
    routing: RoutingCapture | None,
    weights: DecodeWeights | None,
) -> Tensor:
    """Glm4MoeForCausalLM.forward_cached (see there): the rows checked, the forward, the
    logits of each row's last new token (or of all)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected int64 [B, L], got {tuple(input_ids.shape)}")
    b, length = input_ids.shape
    weights = model.decode_weights() if weights is None else weights
    device = weights.embed.device
    if input_ids.device != device:  # the engine builds them on the host
        input_ids = input_ids.to(device)
    if isinstance(lengths, Tensor):
        rows = (slots, start_pos, lengths)
        if any(t.device != device for t in rows):
            slots, start_pos, lengths = (t.to(device) for t in rows)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    batch = CacheBatch.build(
        slots, start_pos, lengths, length, cache.max_len, groups, device=device
    )
    rope = weights.rope(model.model.rotary_emb, batch, cache.max_len)
    capture = routing is not None
    last = _last_tokens(batch, lengths, device) if not all_logits and length > 1 else None
    x, routes = decode_forward(model, weights, input_ids, batch, cache.layers, rope, capture, last)
    if capture:
        k = model.config.num_experts_per_tok
        routing.routed_experts = torch.stack(routes).view(len(routes), b, length, k)
    if not all_logits and length == 1:
        x = x[:, 0]
    return decode_logits(weights, x, model.config.rms_norm_eps)


def _last_tokens(batch: CacheBatch, lengths: Tensor | list[int], device: torch.device) -> Tensor:
    """int64 [B]: the index of each row's last real token among decode_forward's computed
    tokens (the flat [B L], or only the real ones, row after row, when some rows are short)."""
    if not isinstance(lengths, Tensor):
        lengths = torch.tensor(lengths, dtype=torch.int64, device=device)
    if batch.write_rows is not None:
        return lengths.cumsum(0) - 1
    b, length = batch.positions.shape
    return torch.arange(b, device=device) * length + (lengths - 1)


def decode_logits(weights: DecodeWeights, x: Tensor, eps: float) -> Tensor:
    """Hidden rows [..., H] before the final norm -> float32 logits [..., V]."""
    const = weights.norm_const
    if x.dtype == torch.float32 and weights.lm_head.dtype == torch.bfloat16:  # decode_bf16
        h = _rms(x, weights.norm, eps, const).reshape(-1, x.shape[-1]).contiguous()
        return decode_bf16.matmul(h, weights.lm_head).view(*x.shape[:-1], -1)
    if const is not None and x.numel() == x.shape[-1] and x.dtype == torch.float32:
        h = rms_one(x.reshape(1, -1), weights.norm, eps, const.zero)
        logits = (h @ warm(weights.lm_head)).view(*x.shape[:-1], -1)
    elif x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu":  # rows: C
        logits = decode_bf16.matmul(_rms(x, weights.norm, eps, const), weights.lm_head)
    else:
        logits = _rms(x, weights.norm, eps, const) @ weights.lm_head
    return logits if logits.dtype == torch.float32 else logits.float()
