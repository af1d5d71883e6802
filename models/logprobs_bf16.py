"""lm_head's chunked logprobs under bf16 mixed precision: the softmax work in L2-sized tiles.

`models.logprobs._ChunkedLogprobs` hands a chunk here when autocast is on (trainer.dtype
bfloat16). The chunk's logits come out of one bf16 matmul [chunk, V]; the log-softmax, the
entropy and the logit gradient are then computed in fp32 on tiles of rows that fit in L2
(TILE_BYTES of fp32), written back as bf16 for the backward's two matmuls. The fp32 path
(autocast off) makes one [chunk, V] fp32 buffer per pass: at chunk 1024 and V 8192 that is
32 MiB each, read from memory and page-faulted in afresh, and those passes cost about as much
as the lm_head matmuls themselves in a bf16 step (bench/trainer_bf16.py --profile).

Same math as the fp32 path, with z = logits / temperature and logp_all = z - lse:
    forward    lse = m + log s,  s = sum exp(z - m),  H = log s - sum(p (z - m)) / s
    backward   d/dz = g (onehot - p) - g' p (logp_all + H) = p (-g - g' (logp_all + H)) + onehot g
All reductions and the exponentials are fp32; only the matmul operands are bf16.

A training forward (hidden requires grad) whose bf16 logits [N, V] fit in KEEP_LOGITS_BYTES
keeps them for the backward, which then skips the recompute matmul (2 N V H FLOPs, a ninth of
a 40M MoE step's work on the bench shape); larger ones are recomputed chunk by chunk, as in
fp32, so the memory stays bounded at any vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TILE_BYTES = 1 << 20  # fp32 bytes of one tile: two such tiles (logp_all, p) stay in L2
KEEP_LOGITS_BYTES = 64 << 20  # a training forward keeps its bf16 logits up to this size


def logits_store(hidden: Tensor, weight: Tensor) -> list[Tensor] | None:
    """An empty list that forward_chunk fills with each chunk's bf16 logits for the backward,
    for a training forward under autocast whose [N, V] logits fit in KEEP_LOGITS_BYTES; else
    None (the backward recomputes them). hidden [N, H], weight [V, H] as the caller gave them."""
    device = hidden.device.type
    if not (hidden.requires_grad and torch.is_autocast_enabled(device)):
        return None
    size = hidden.shape[0] * weight.shape[0] * torch.get_autocast_dtype(device).itemsize
    return [] if size <= KEEP_LOGITS_BYTES else None


def _tile_rows(vocab: int) -> int:
    return max(1, TILE_BYTES // (4 * vocab))


def _tile_logits(z: Tensor, temperature: float) -> Tensor:
    """fp32 copy of a bf16 logits tile, divided by the temperature (a fresh tile buffer)."""
    out = z.float()
    return out.div_(temperature) if temperature != 1.0 else out


def forward_chunk(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    target_logit: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    kept: list[Tensor] | None = None,
) -> None:
    """One chunk's forward, written into the fp32 [c] views target_logit (z at the target),
    lse and entropy (None: not asked). hidden [c, H] and weight [V, H] are bf16. kept: the
    logits_store list, which gets this chunk's bf16 logits."""
    z = F.linear(hidden, weight)  # bf16 [c, V]
    if kept is not None:
        kept.append(z)
    step = _tile_rows(z.shape[1])
    for r in range(0, z.shape[0], step):
        rows = slice(r, r + step)
        logits = _tile_logits(z[rows], temperature)
        target_logit[rows] = logits.gather(1, targets[rows, None]).squeeze(1)
        peak = logits.amax(dim=1, keepdim=True)
        shifted = logits.sub_(peak)  # z - m, in place
        p = shifted.exp()
        total = p.sum(dim=1)
        log_total = total.log()
        lse[rows] = peak.squeeze(1) + log_total
        if entropy is not None:
            dot = p.mul_(shifted).sum(dim=1)  # sum p (z - m); not bmm: autocast would cast it
            entropy[rows] = log_total - dot / total


def logit_grad(
    z: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """bf16 [c, V]: d loss / d (logits before the temperature) of one chunk, from its bf16
    logits z [c, V] (the forward's, bit for bit). lse, entropy, grad_* are fp32 [c]."""
    grad = torch.empty_like(z)
    step = _tile_rows(z.shape[1])
    for r in range(0, z.shape[0], step):
        rows = slice(r, r + step)
        logp_all = _tile_logits(z[rows], temperature).sub_(lse[rows, None])
        p = logp_all.exp()
        if grad_entropy is not None:  # coefficient -g - g' (logp_all + H), in place
            coef = logp_all.add_(entropy[rows, None]).mul_(-grad_entropy[rows, None])
            if grad_logp is not None:
                coef.sub_(grad_logp[rows, None])
            p.mul_(coef)
        else:
            p.mul_(-grad_logp[rows, None])
        if grad_logp is not None:
            p.scatter_add_(1, targets[rows, None], grad_logp[rows, None])
        if temperature != 1.0:
            p.div_(temperature)
        grad[rows] = p  # cast to bf16 on the copy
    return grad


def backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    *,
    temperature: float,
    chunk_size: int,
    needs: tuple[bool, bool],
    grad_dtypes: tuple[torch.dtype, torch.dtype],
    kept: list[Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad hidden, grad weight) of `_ChunkedLogprobs` under autocast. hidden [N, H] and
    weight [V, H] are the bf16 operands the forward saved, kept its logits_store (None:
    recompute the logits); the gradients come back in the dtypes of the original inputs
    (grad_dtypes), the weight's summed over chunks in fp32."""
    need_h, need_w = needs
    grad_h = hidden.new_empty(hidden.shape, dtype=grad_dtypes[0]) if need_h else None
    grad_w = None  # fp32 [V, H]: the first chunk's product, then the sum over chunks
    with_entropy = grad_entropy is not None and entropy.numel() > 0
    if grad_logp is None and not with_entropy:
        zero_w = weight.new_zeros(weight.shape, dtype=grad_dtypes[1]) if need_w else None
        return (grad_h.zero_() if need_h else None), zero_w
    for s in range(0, hidden.shape[0], chunk_size):
        rows = slice(s, s + chunk_size)
        h = hidden[rows]
        z = kept[s // chunk_size] if kept is not None else F.linear(h, weight)
        grad_z = logit_grad(
            z,
            targets[rows],
            lse[rows],
            entropy[rows] if with_entropy else None,
            None if grad_logp is None else grad_logp[rows],
            grad_entropy[rows] if with_entropy else None,
            temperature,
        )
        if need_h:
            grad_h[rows] = grad_z @ weight
        if need_w:  # bf16 product, fp32 sum over chunks
            part = (grad_z.t() @ h).float()
            grad_w = part if grad_w is None else grad_w.add_(part)
    return grad_h, (grad_w.to(grad_dtypes[1]) if need_w else None)
