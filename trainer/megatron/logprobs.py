"""Per-token logprobs and entropies from vocab-parallel logits (megatron's output layer).

Under tensor parallelism the output layer leaves each TP rank with a contiguous slice of the
vocabulary: rank r holds logits for token ids [r * V/tp, (r + 1) * V/tp). The log-partition,
the target's logit and the entropy are assembled with three all-reduces over the TP group
(max without gradient; sums with megatron's `reduce_from_tensor_model_parallel_region`, whose
backward is the identity), so gradients are exact on every rank.

Alignment is the trainer contract's (trainer/backend.py, and models' `token_logprobs`):
logprob[t] = log_softmax(logits[t - 1] / temperature)[input_ids[t]], 0 at the first token of
every packed sequence; the entropy is aligned the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import Tensor


def vocab_parallel_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor | None]:
    """logits [N, V/tp] (this rank's vocab slice, any float dtype), targets int64 [N] (global
    ids) -> (logprob float32 [N], entropy float32 [N] or None) at `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    group = group or parallel_state.get_tensor_model_parallel_group()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    z = logits.float() / temperature
    with torch.no_grad():
        peak = z.max(dim=-1).values
        if size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    z = z - peak[:, None]
    exp = z.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1), group)
    log_z = sum_exp.log()
    vocab = z.shape[-1]
    local = targets - rank * vocab
    inside = (local >= 0) & (local < vocab)
    picked = z.gather(1, local.clamp(0, vocab - 1)[:, None]).squeeze(1) * inside
    logprob = reduce_from_tensor_model_parallel_region(picked, group) - log_z
    if not with_entropy:
        return logprob, None
    mean_z = reduce_from_tensor_model_parallel_region((exp * z).sum(dim=-1), group) / sum_exp
    return logprob, log_z - mean_z


def packed_token_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    cu_seqlens: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Contract-aligned logprobs of a packed micro-batch.

    logits [T', V/tp] for positions 0..T'-1 (T' >= T; rows past T are padding),
    input_ids int64 [T], cu_seqlens int64 [B+1] -> logprob float32 [T], entropy float32 [T]
    (or None); both 0 at each sequence's first token.
    """
    total = input_ids.numel()
    targets = torch.roll(input_ids, -1)  # row t predicts input_ids[t + 1]
    lp, ent = vocab_parallel_logprobs(
        logits[:total], targets, temperature=temperature, with_entropy=with_entropy
    )
    keep = torch.ones(total, dtype=torch.bool, device=input_ids.device)
    keep[cu_seqlens[:-1].to(input_ids.device)] = False

    def shift(x: Tensor) -> Tensor:
        shifted = torch.cat([x.new_zeros(1), x[:-1]])
        return torch.where(keep, shifted, torch.zeros_like(shifted))

    return shift(lp), (shift(ent) if ent is not None else None)
