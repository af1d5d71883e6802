"""Move GLM-4.x weights between an HF state dict and a (sharded) megatron GPTModel.

`load_hf_weights` fills this rank's megatron tensors from HF on-disk names (an HF checkpoint,
or our torch model's `hf_state_dict()`); it fails loudly on anything missing, unexpected or
of the wrong shape. `export_hf_weights` is the reverse for the rollout engines: full tensors
under HF names, gathered over TP and expert-TP (all_gather), EP (all_gather of the local
experts) and PP (each stage broadcasts its tensors over the pipeline group), so every rank
yields the same complete stream. Every rank must consume the whole iterator (collectives).
The tensor rules are in convert.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from trainer.megatron.arch import GlmArch
from trainer.megatron.convert import ConversionError, Entry, RankLayout, entries, shard, unshard

_SKIP_SUFFIXES = ("_extra_state", "inv_freq")


def rank_layout(model: torch.nn.Module, arch: GlmArch) -> RankLayout:
    """This rank's place: layer offset from the model's decoder, stages, expert slice."""
    layers = model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    return RankLayout(
        layer_offset=offset,
        num_local_layers=len(layers),
        first_stage=ps.is_pipeline_first_stage(),
        last_stage=ps.is_pipeline_last_stage(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
    )


def _group(name: str | None):
    """(group, rank, size) of an entry's split group."""
    table = {
        "tp": (
            ps.get_tensor_model_parallel_group,
            ps.get_tensor_model_parallel_rank,
            ps.get_tensor_model_parallel_world_size,
        ),
        "etp": (
            ps.get_expert_tensor_parallel_group,
            ps.get_expert_tensor_parallel_rank,
            ps.get_expert_tensor_parallel_world_size,
        ),
        "ep": (
            ps.get_expert_model_parallel_group,
            ps.get_expert_model_parallel_rank,
            ps.get_expert_model_parallel_world_size,
        ),
    }
    if name is None:
        return None, 0, 1
    group, rank, size = table[name]
    return group(), rank(), size()


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of an unwrapped GPTModel, by megatron name."""
    return {
        k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith(_SKIP_SUFFIXES)
    }


def _global_expert(entry: Entry, layout: RankLayout, arch: GlmArch) -> int | None:
    if entry.expert is None:
        return None
    return layout.ep_rank * (arch.num_experts // layout.ep_size) + entry.expert


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], arch: GlmArch, impl: str = "local"
) -> None:
    """Copy HF-named tensors into this rank's megatron tensors (build the optimizer after)."""
    layout = rank_layout(model, arch)
    targets = named_tensors(model)
    filled: set[str] = set()
    for entry in entries(arch, layout, impl):
        if entry.megatron not in targets:
            raise ConversionError(f"the megatron model has no tensor {entry.megatron!r}")
        names = entry.hf_names(_global_expert(entry, layout, arch))
        missing = [n for n in names if n not in hf_state]
        if missing:
            raise ConversionError(f"HF weights lack {missing} (needed for {entry.megatron})")
        _, rank, size = _group(entry.group)
        value = shard(entry, [hf_state[n] for n in names], arch, rank, size)
        target = targets[entry.megatron]
        if tuple(value.shape) != tuple(target.shape):
            raise ConversionError(
                f"{entry.megatron}: HF {names} give shape {tuple(value.shape)}, "
                f"megatron expects {tuple(target.shape)}"
            )
        target.copy_(value)
        filled.add(entry.megatron)
    unfilled = sorted(set(targets) - filled)
    if unfilled:
        raise ConversionError(f"megatron tensors no HF weight maps to: {unfilled[:8]}")


def _all_gather(tensor: torch.Tensor, group_name: str | None) -> list[torch.Tensor]:
    group, _, size = _group(group_name)
    if size == 1:
        return [tensor]
    pieces = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def _stage_items(
    model: torch.nn.Module, arch: GlmArch, impl: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors of this pipeline stage (collectives over TP, expert-TP and EP)."""
    layout = rank_layout(model, arch)
    tensors = named_tensors(model)
    per_rank = arch.num_experts // layout.ep_size
    for entry in entries(arch, layout, impl):
        if not entry.export:
            continue
        pieces = _all_gather(tensors[entry.megatron].detach(), entry.group)
        hf_tensors = unshard(entry, pieces, arch)
        if entry.expert is None:
            yield from zip(entry.hf_names(), hf_tensors)
            continue
        gathered = [_all_gather(t, "ep") for t in hf_tensors]  # [hf tensor][ep rank]
        for ep_rank in range(layout.ep_size):
            names = entry.hf_names(ep_rank * per_rank + entry.expert)
            yield from zip(names, (g[ep_rank] for g in gathered))


def _across_pipeline(
    items: Iterator[tuple[str, torch.Tensor]], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stage's items on every rank of the pipeline group, stage by stage."""
    size = ps.get_pipeline_model_parallel_world_size()
    if size == 1:
        yield from items
        return
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    me = ps.get_pipeline_model_parallel_rank()
    for stage in range(size):
        while True:
            item = next(items, None) if stage == me else None
            meta = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(meta, src=ranks[stage], group=group)
            if meta[0] is None:
                break
            name, shape, dtype = meta[0]
            tensor = (
                item[1].contiguous()
                if stage == me
                else torch.empty(shape, dtype=dtype, device=device)
            )
            dist.broadcast(tensor, src=ranks[stage], group=group)
            yield name, tensor


def export_hf_weights(
    model: torch.nn.Module, arch: GlmArch, impl: str = "local"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight of the model; identical on every rank.

    MTP layers are not part of the megatron model and are not exported.
    """
    device = next(model.parameters()).device
    yield from _across_pipeline(_stage_items(model, arch, impl), device)
