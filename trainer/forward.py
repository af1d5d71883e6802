"""The training forward: per-token logprobs computed at the trainable tokens only.

`Glm4MoeForCausalLM.token_logprobs` runs lm_head on every position of a pack; the loss only
ever reads positions with loss mask 1 (response tokens the policy generated), typically a third
of a short-answer RL pack. This runs the trunk once (`forward_packed`) and the chunked
lm_head log-softmax (`models.logprobs.chunked_token_logprobs`) on the hidden states that
predict trainable tokens (PackedBatch.predictor: t - 1, or under shared prompt trees the
prompt's last token for a completion's first), scattering the results into [T] tensors
that are 0 elsewhere. At the trainable positions the numbers are the same as
token_logprobs' (the first-step gate checks it).

`mtp_token_loss` is the MTP layers' next-next-token cross-entropy over the same trunk pass
(SFT with trainer.mtp_loss_weight > 0, as in GLM's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.glm4moe import Glm4MoeForCausalLM
from models.logprobs import chunked_token_logprobs
from models.moe import RoutingReplay
from models.mtp import mtp_targets
from trainer.backend import PackedBatch


@dataclass
class TrainForward:
    """logprobs, entropy float32 [T] (0 off the trainable tokens); expert_load float32
    [n_moe, E]; aux_loss float32 scalar; hidden [T, H] the trunk's normed output (only
    with full_hidden)."""

    logprobs: Tensor
    entropy: Tensor
    expert_load: Tensor
    aux_loss: Tensor
    hidden: Tensor | None = None


def trainable_logprobs(
    model: Glm4MoeForCausalLM,
    batch: PackedBatch,
    *,
    chunk_size: int,
    routing: RoutingReplay | None = None,
    full_hidden: bool = False,
) -> TrainForward:
    """Differentiable logprobs and entropies of `batch`'s trainable tokens. Only the rows
    that predict them are asked of the trunk (forward_packed's `keep`: the last layer's MLP
    skips the rest); full_hidden: every row, returned as `hidden` (the MTP loss reads it)."""
    device = batch.input_ids.device
    predictor = batch.predictor  # t - 1, or a shared prompt's last token
    positions = ((batch.loss_mask > 0) & (predictor >= 0)).nonzero().squeeze(1)
    rows = predictor[positions]
    keep = None
    if not full_hidden and rows.numel():  # a prompt's last token predicts k first tokens
        keep, rows = torch.unique(rows, sorted=True, return_inverse=True)
    out = model.forward_packed(
        batch.input_ids, batch.cu_seqlens, routing=routing, layout=batch.layout, keep=keep
    )
    logp, entropy = chunked_token_logprobs(
        out.hidden[rows],
        model.lm_head.weight,
        batch.input_ids[positions],
        temperature=batch.temperature,
        with_entropy=True,
        chunk_size=chunk_size,
    )
    zeros = torch.zeros(batch.num_tokens, dtype=torch.float32, device=device)
    return TrainForward(
        logprobs=zeros.index_put((positions,), logp),
        entropy=zeros.index_put((positions,), entropy),
        expert_load=out.expert_load,
        aux_loss=out.aux_loss,
        hidden=out.hidden if full_hidden else None,
    )


def mtp_token_loss(
    model: Glm4MoeForCausalLM, batch: PackedBatch, hidden: Tensor, *, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(summed -log p of every MTP layer's targets, number of targets), both float32 scalars.

    MTP layer k at row t predicts input_ids[t + k + 2]; a row counts when that token lies in
    the same sequence and has loss mask 1. hidden: the trunk's normed output [T, H] on batch.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    count = hidden.new_zeros((), dtype=torch.float32)
    for depth, out in enumerate(model.forward_mtp(batch.input_ids, batch.cu_seqlens, hidden)):
        targets, valid = mtp_targets(batch.input_ids, batch.cu_seqlens, depth)
        shift = depth + 2
        target_mask = torch.cat([batch.loss_mask[shift:], batch.loss_mask.new_zeros(shift)])
        rows = (valid & (target_mask > 0)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        logp, _ = chunked_token_logprobs(
            out[rows], model.lm_head.weight, targets[rows], chunk_size=chunk_size
        )
        total = total - logp.float().sum()
        count = count + rows.numel()
    return total, count
