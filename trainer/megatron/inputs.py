"""From the trainer's PackedBatch to megatron model inputs, and the data-parallel split.

A micro-batch of B packed sequences becomes one megatron row: input_ids [1, T'] with
`PackedSeqParams(qkv_format="thd")` carrying the sequence boundaries, so RoPE restarts per
sequence and attention stays inside each one (core_attention.py; TE's flash attention on
GPUs). T' is T rounded up to the TP size (sequence parallelism splits the row evenly); the
padding forms its own trailing "sequence", and `first_padding_row` tells the router hooks
(router_stats.LoadMask) which of this rank's rows to leave out of the expert-load counts.

Data parallelism: every rank is handed the step's full list of micro-batches; DP rank d takes
batches d, d + D, d + 2D, ... (D = DP size). When the count does not divide evenly, ranks that
come up short get a copy of their last batch with an all-zero loss mask, so every rank runs the
same number of micro-batches (expert parallelism spans DP ranks and its all-to-alls need
every rank in every forward pass). Those filler batches add nothing to the loss or metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from trainer.backend import PackedBatch


@dataclass
class MegatronInputs:
    """One micro-batch in megatron's form.

    input_ids      int64 [1, T']  tokens, padded to a multiple of the TP size
    packed         PackedSeqParams (thd) with int32 cu_seqlens [B (+1 if padded) + 1]
    batch          the original PackedBatch (loss inputs, T tokens)
    filler         True for a zero-mask copy that only keeps the ranks in step
    """

    input_ids: Tensor
    packed: PackedSeqParams
    batch: PackedBatch
    filler: bool = False

    def first_padding_row(self, sp_rank: int, sp_size: int) -> int | None:
        """The first row this rank routes that is not a real token (None: all are real).

        Under sequence parallelism rank r routes rows [r * T'/n, (r + 1) * T'/n) of the row;
        without it pass sp_rank=0, sp_size=1.
        """
        if self.filler:
            return 0
        rows = self.input_ids.shape[1] // sp_size
        first = self.batch.num_tokens - sp_rank * rows
        return None if first >= rows else max(first, 0)


def to_megatron_inputs(
    batch: PackedBatch, pad_multiple: int, device: torch.device, filler: bool = False
) -> MegatronInputs:
    """Pad a PackedBatch to a multiple of `pad_multiple` tokens and describe it as THD."""
    total = batch.num_tokens
    pad = (-total) % pad_multiple
    ids = batch.input_ids.to(device=device, dtype=torch.long)
    cu = batch.cu_seqlens.to(device=device, dtype=torch.int32)
    if pad:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
    longest = int((cu[1:] - cu[:-1]).max())
    packed = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return MegatronInputs(ids[None], packed, batch.to(device), filler)


def dp_share(batches: list[PackedBatch]) -> list[tuple[PackedBatch, bool]]:
    """This DP rank's micro-batches as (batch, is_filler); equal counts on every rank."""
    if not batches:
        raise ValueError("batches: expected at least one micro-batch")
    size, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine: list[tuple[PackedBatch, bool]] = [(b, False) for b in batches[rank::size]]
    per_rank = -(-len(batches) // size)
    template = mine[-1][0] if mine else batches[-1]
    filler = replace(template, loss_mask=torch.zeros_like(template.loss_mask))
    mine += [(filler, True)] * (per_rank - len(mine))
    return mine


def gather_dp(local: list[Tensor], num_batches: int) -> list[Tensor]:
    """Inverse of dp_share for per-batch results: every rank gets all `num_batches` results
    in the original order (fillers dropped)."""
    size = ps.get_data_parallel_world_size()
    if size == 1:
        return local[:num_batches]
    everyone: list[list[Tensor] | None] = [None] * size
    dist.all_gather_object(everyone, [t.cpu() for t in local], group=ps.get_data_parallel_group())
    return [everyone[i % size][i // size] for i in range(num_batches)]


def broadcast_from_last_stage(obj: object) -> object:
    """Objects computed on the last pipeline stage, on every stage."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = ps.get_pipeline_model_parallel_group()
    holder = [obj]
    dist.broadcast_object_list(holder, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    return holder[0]
