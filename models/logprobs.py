"""Per-token logprobs and entropies through lm_head in chunks, never holding [T, V] fp32 logits.

A custom autograd function: the forward keeps only the per-token log-partition (and entropy),
plus the chunks' logits when all of them are small (logprobs_bf16.KEEP_LOGITS_BYTES: a short
RL pack's, ~0.6 MB on the e2e job, which saves the backward a matmul); otherwise the backward
recomputes each chunk's logits. It forms the logit gradient in closed form
    d logp_t / dz = onehot(y_t) - p,   d H_t / dz = -p * (log p + H_t),
with z = logits / temperature. Peak extra memory is a few [chunk_size, V] fp32 buffers for
the forward and the backward alike (autograd through a plain chunk loop would keep every
chunk's softmax alive until backward: the [T, V] tensor this module exists to avoid).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models import logprobs_bf16


def _chunk_logits(h: Tensor, weight: Tensor, temperature: float) -> Tensor:
    logits = F.linear(h, weight).float()
    return logits / temperature if temperature != 1.0 else logits


def _compute_operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """hidden and weight in the dtype lm_head computes in: autocast's (the trainer's bf16
    mixed precision) when it is on, so that the backward, which runs outside autocast,
    recomputes exactly the forward's logits in the same dtype; else as they are."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype)


def _fp32_store(hidden: Tensor, weight: Tensor) -> list[Tensor] | None:
    """An empty list for the fp32 forward's chunk logits when the backward will run (hidden
    requires grad) and all of them fit in logprobs_bf16.KEEP_LOGITS_BYTES; else None (the
    backward recomputes each chunk: the memory stays bounded at any vocabulary)."""
    size = hidden.shape[0] * weight.shape[0] * 4
    keep = hidden.requires_grad and size <= logprobs_bf16.KEEP_LOGITS_BYTES
    return [] if keep else None


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in their (autocast) dtype, fp32 accumulation inside the kernel, as float32."""
    return (a @ b).float()


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        temperature: float,
        with_entropy: bool,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        ctx.grad_dtypes = hidden.dtype, weight.dtype
        ctx.kept = logprobs_bf16.logits_store(hidden, weight)  # bf16 logits for the backward
        hidden, weight = _compute_operands(hidden, weight)
        ctx.autocast = ctx.grad_dtypes != (hidden.dtype, weight.dtype)
        if not ctx.autocast:  # fp32: keep the chunks' logits when small, as bf16 does
            ctx.kept = _fp32_store(hidden, weight)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            if ctx.autocast:  # bf16: the softmax work in L2-sized tiles (models/logprobs_bf16.py)
                rows = slice(s, s + chunk_size)
                ent = entropy[rows] if with_entropy else None
                logprobs_bf16.forward_chunk(hidden[rows], weight, targets[rows], temperature,
                                            logp[rows], lse[rows], ent, ctx.kept)  # fmt: skip
                continue
            z = _chunk_logits(hidden[s : s + chunk_size], weight, temperature)
            if ctx.kept is not None:
                ctx.kept.append(z)  # never written: the backward subtracts into a new tensor
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[s : s + chunk_size] = chunk_lse
            logp[s : s + chunk_size] = z.gather(1, targets[s : s + chunk_size, None]).squeeze(1)
            if with_entropy:
                p = torch.exp(z - chunk_lse[:, None])
                entropy[s : s + chunk_size] = chunk_lse - (p * z).sum(dim=-1)
        logp -= lse
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(targets)
        ctx.set_materialize_grads(False)  # an unused entropy (coef 0) costs no backward work
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor | None, grad_entropy: Tensor | None) -> tuple:
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        if ctx.autocast:  # bf16 mixed precision: models/logprobs_bf16.py
            return (*logprobs_bf16.backward(hidden, weight, targets, lse, entropy, grad_logp,
                grad_entropy, temperature=tau, chunk_size=chunk, needs=ctx.needs_input_grad[:2],
                grad_dtypes=ctx.grad_dtypes, kept=ctx.kept), None, None, None, None)  # fmt: skip
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hidden_dtype, weight_dtype = ctx.grad_dtypes
        grad_h = torch.empty_like(hidden, dtype=hidden_dtype) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        has_entropy = grad_entropy is not None and entropy.numel() > 0
        for i, s in enumerate(range(0, hidden.shape[0], chunk)):
            h = hidden[s : s + chunk]
            if ctx.kept is not None:  # the forward's logits: the same numbers, no matmul
                logp_all = ctx.kept[i] - lse[s : s + chunk, None]
            else:
                logp_all = _chunk_logits(h, weight, tau).sub_(lse[s : s + chunk, None])
            p = logp_all.exp()
            # the same values as 0 - g p (+ onehot g) - g' p (log p + H), fewer [chunk, V] passes
            grad_z = None
            if grad_logp is not None:
                g = grad_logp[s : s + chunk, None]
                grad_z = p * -g
                grad_z.scatter_add_(1, targets[s : s + chunk, None], g)
            if has_entropy:
                g = grad_entropy[s : s + chunk, None]
                term = g * p * (logp_all + entropy[s : s + chunk, None])
                grad_z = -term if grad_z is None else grad_z.sub_(term)
            if grad_z is None:
                grad_z = torch.zeros_like(p)
            if tau != 1.0:
                grad_z /= tau
            grad_z = grad_z.to(weight.dtype)
            if need_h:
                grad_h[s : s + chunk] = grad_z @ weight
            if need_w:
                grad_w += _mm_f32(grad_z.t(), h) if ctx.autocast else grad_z.t().float() @ h.float()
        return grad_h, (grad_w.to(weight_dtype) if need_w else None), None, None, None, None


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """hidden [N, H] predicts targets int64 [N] through lm_head weight [V, H].

    Returns logprobs float32 [N] = log_softmax(hidden @ W^T / temperature)[targets] and, with
    with_entropy, the entropy float32 [N] of the same distributions. Differentiable in hidden
    and weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    logp, entropy = _ChunkedLogprobs.apply(
        hidden, weight, targets, float(temperature), with_entropy, int(chunk_size)
    )
    return logp, (entropy if with_entropy else None)
