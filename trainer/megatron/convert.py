"""HF <-> Megatron weight conversion for GLM-4.x (pure tensor rules, no process groups).

Each megatron parameter of one rank is described by an `Entry`: its megatron name, the HF
on-disk names it is made of, a `Kind` (how HF tensors fuse into the megatron tensor and how
that tensor is split over a TP group) and which group splits it. `entries()` lists every
entry of a rank's model; `shard()` builds the rank's tensor from HF tensors (loading) and
`unshard()` turns the gathered pieces back into HF tensors (export, see export.py).

Layouts (TP size n, rank r; nq = query heads per KV group, hd = head_dim):
  qkv       megatron `linear_qkv` interleaves per query group g:
            [q_g (nq*hd rows), k_g (hd rows), v_g (hd rows)] for g = 0..kv_heads-1; TP splits
            whole groups, so rank r holds groups [r*G/n, (r+1)*G/n). The bias likewise.
  gate_up   `linear_fc1` of SwiGLU holds [gate; up]; under TP rank r holds
            [gate.chunk(n)[r]; up.chunk(n)[r]] (megatron chunks fc1's output in two halves).
  column    split along dim 0 (vocab-parallel embedding and output layer, ...).
  row       split along dim 1 (linear_proj, linear_fc2).
  replicated every rank holds the full tensor (norms, router weight, expert bias).
Experts: rank (ep_rank) holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep) as local indices
0..E/ep-1, each split over the expert-TP group. HF names are per expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.megatron.arch import GlmArch


class ConversionError(ValueError):
    """Missing/unexpected tensors or shapes that do not match; the message names them."""


class Kind:
    """How HF tensors become one megatron tensor and how it splits over a group."""

    def fuse_shard(self, hf: Sequence[torch.Tensor], rank: int, size: int, arch: GlmArch):
        raise NotImplementedError

    def unshard(self, shards: Sequence[torch.Tensor], arch: GlmArch) -> list[torch.Tensor]:
        raise NotImplementedError


class Replicated(Kind):
    def fuse_shard(self, hf, rank, size, arch):
        return hf[0]

    def unshard(self, shards, arch):
        return [shards[0]]


class Split(Kind):
    def __init__(self, dim: int) -> None:
        self.dim = dim

    def fuse_shard(self, hf, rank, size, arch):
        return hf[0].chunk(size, dim=self.dim)[rank]

    def unshard(self, shards, arch):
        return [torch.cat(list(shards), dim=self.dim)]


class GateUp(Kind):
    def fuse_shard(self, hf, rank, size, arch):
        gate, up = hf
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])

    def unshard(self, shards, arch):
        halves = [s.chunk(2) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


class QKV(Kind):
    """Works for the weight [rows, hidden] and the bias [rows] alike."""

    def fuse_shard(self, hf, rank, size, arch):
        q, k, v = hf
        groups = arch.num_kv_heads
        rest = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, -1, *rest),
                k.reshape(groups, -1, *rest),
                v.reshape(groups, -1, *rest),
            ],
            dim=1,
        )  # [groups, (nq + 2) * hd, *rest]
        return fused.chunk(size)[rank].reshape(-1, *rest)

    def unshard(self, shards, arch):
        full = torch.cat(list(shards))
        rest = full.shape[1:]
        per_group = full.reshape(arch.num_kv_heads, -1, *rest)
        q_rows = arch.num_heads // arch.num_kv_heads * arch.head_dim
        q, k, v = per_group.split([q_rows, arch.head_dim, arch.head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


KINDS: dict[str, Kind] = {
    "replicated": Replicated(),
    "column": Split(0),
    "row": Split(1),
    "gate_up": GateUp(),
    "qkv": QKV(),
}


@dataclass(frozen=True)
class Entry:
    """One megatron tensor of this rank and the HF tensors it is made of.

    group: "tp" (tensor parallel), "etp" (expert tensor parallel) or None (not split).
    expert: local expert index for routed-expert tensors (their HF names contain "{j}", the
        global expert index), else None.
    export: False for a tensor that exists on this rank but is exported elsewhere (the
        tied output layer of the last pipeline stage).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str
    group: str | None = None
    expert: int | None = None
    export: bool = True

    def hf_names(self, expert_global: int | None = None) -> tuple[str, ...]:
        return tuple(n.replace("{j}", str(expert_global)) for n in self.hf)


@dataclass(frozen=True)
class ParamNames:
    """Megatron parameter names of one layer spec ({i} = local layer, {e} = local expert)."""

    input_norm: str
    pre_mlp_norm_dense: str
    pre_mlp_norm_moe: str
    expert_fc1: str
    expert_fc2: str


_LAYER = "decoder.layers.{i}."
PARAM_NAMES: dict[str, ParamNames] = {
    "local": ParamNames(
        input_norm=_LAYER + "input_layernorm.weight",
        pre_mlp_norm_dense=_LAYER + "pre_mlp_layernorm.weight",
        pre_mlp_norm_moe=_LAYER + "pre_mlp_layernorm.weight",
        expert_fc1=_LAYER + "mlp.experts.local_experts.{e}.linear_fc1.weight",
        expert_fc2=_LAYER + "mlp.experts.local_experts.{e}.linear_fc2.weight",
    ),
    # TransformerEngine spec (GPU): input norm fused into linear_qkv, the dense layers'
    # pre-MLP norm fused into linear_fc1; experts as SequentialMLP of TE linears ...
    "te": ParamNames(
        input_norm=_LAYER + "self_attention.linear_qkv.layer_norm_weight",
        pre_mlp_norm_dense=_LAYER + "mlp.linear_fc1.layer_norm_weight",
        pre_mlp_norm_moe=_LAYER + "pre_mlp_layernorm.weight",
        expert_fc1=_LAYER + "mlp.experts.local_experts.{e}.linear_fc1.weight",
        expert_fc2=_LAYER + "mlp.experts.local_experts.{e}.linear_fc2.weight",
    ),
    # ... or as TEGroupedMLP (grouped_gemm), one weight per local expert in one module.
    "te_grouped": ParamNames(
        input_norm=_LAYER + "self_attention.linear_qkv.layer_norm_weight",
        pre_mlp_norm_dense=_LAYER + "mlp.linear_fc1.layer_norm_weight",
        pre_mlp_norm_moe=_LAYER + "pre_mlp_layernorm.weight",
        expert_fc1=_LAYER + "mlp.experts.linear_fc1.weight{e}",
        expert_fc2=_LAYER + "mlp.experts.linear_fc2.weight{e}",
    ),
}


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits: the layers it builds and its expert slice."""

    layer_offset: int
    num_local_layers: int
    first_stage: bool
    last_stage: bool
    ep_rank: int = 0
    ep_size: int = 1


def _attention(arch: GlmArch, i: int, hf: str) -> list[Entry]:
    mg = _LAYER.format(i=i) + "self_attention."
    out = [
        Entry(
            mg + "linear_qkv.weight",
            tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
            "qkv",
            "tp",
        ),
        Entry(mg + "linear_proj.weight", (hf + "self_attn.o_proj.weight",), "row", "tp"),
    ]
    if arch.qkv_bias:
        out.append(
            Entry(
                mg + "linear_qkv.bias",
                tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"),
                "qkv",
                "tp",
            )
        )
    if arch.qk_norm:
        out += [
            Entry(mg + "q_layernorm.weight", (hf + "self_attn.q_norm.weight",), "replicated"),
            Entry(mg + "k_layernorm.weight", (hf + "self_attn.k_norm.weight",), "replicated"),
        ]
    return out


def _swiglu(mg: str, hf: str, group: str, expert: int | None = None, fc1=None, fc2=None):
    return [
        Entry(
            fc1 or mg + "linear_fc1.weight",
            (hf + "gate_proj.weight", hf + "up_proj.weight"),
            "gate_up",
            group,
            expert,
        ),
        Entry(fc2 or mg + "linear_fc2.weight", (hf + "down_proj.weight",), "row", group, expert),
    ]


def _moe(arch: GlmArch, names: ParamNames, i: int, hf: str, layout: RankLayout) -> list[Entry]:
    mg = _LAYER.format(i=i) + "mlp."
    out = [
        Entry(mg + "router.weight", (hf + "mlp.gate.weight",), "replicated"),
        Entry(mg + "router.expert_bias", (hf + "mlp.gate.e_score_correction_bias",), "replicated"),
    ]
    for e in range(arch.num_experts // layout.ep_size):
        fc1, fc2 = (n.format(i=i, e=e) for n in (names.expert_fc1, names.expert_fc2))
        out += _swiglu("", hf + "mlp.experts.{j}.", "etp", e, fc1, fc2)
    if arch.num_shared_experts:
        out += _swiglu(mg + "shared_experts.", hf + "mlp.shared_experts.", "tp")
    return out


def layer_entries(arch: GlmArch, names: ParamNames, i: int, layout: RankLayout) -> list[Entry]:
    """Entries of local layer i (global layer layout.layer_offset + i)."""
    layer = layout.layer_offset + i
    hf = f"model.layers.{layer}."
    moe = arch.moe_layer_pattern[layer] == 1
    pre_mlp = names.pre_mlp_norm_moe if moe else names.pre_mlp_norm_dense
    out = [
        Entry(names.input_norm.format(i=i), (hf + "input_layernorm.weight",), "replicated"),
        Entry(pre_mlp.format(i=i), (hf + "post_attention_layernorm.weight",), "replicated"),
        *_attention(arch, i, hf),
    ]
    if moe:
        return out + _moe(arch, names, i, hf, layout)
    return out + _swiglu(_LAYER.format(i=i) + "mlp.", hf + "mlp.", "tp")


def names_key(transformer_engine: bool, grouped_gemm: bool) -> str:
    """The PARAM_NAMES key of a spec: "local", "te" or "te_grouped"."""
    if not transformer_engine:
        return "local"
    return "te_grouped" if grouped_gemm else "te"


def entries(arch: GlmArch, layout: RankLayout, impl: str = "local") -> list[Entry]:
    """Every megatron tensor of this rank, in model order (impl: a PARAM_NAMES key)."""
    names = PARAM_NAMES[impl]
    out: list[Entry] = []
    if layout.first_stage:
        out.append(
            Entry(
                "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "column", "tp"
            )
        )
    for i in range(layout.num_local_layers):
        out += layer_entries(arch, names, i, layout)
    if layout.last_stage:
        out.append(Entry("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
        if not arch.tie_word_embeddings:
            out.append(Entry("output_layer.weight", ("lm_head.weight",), "column", "tp"))
        elif not layout.first_stage:  # tied, PP > 1: the last stage keeps a synced copy
            out.append(
                Entry(
                    "output_layer.weight",
                    ("model.embed_tokens.weight",),
                    "column",
                    "tp",
                    export=False,
                )
            )
    return out


def shard(
    entry: Entry, hf: Sequence[torch.Tensor], arch: GlmArch, rank: int, size: int
) -> torch.Tensor:
    """This rank's megatron tensor from the entry's HF tensors (in entry.hf order)."""
    return KINDS[entry.kind].fuse_shard(hf, rank, size, arch)


def unshard(entry: Entry, shards: Sequence[torch.Tensor], arch: GlmArch) -> list[torch.Tensor]:
    """HF tensors (in entry.hf order) from the pieces of every rank of the entry's group."""
    return KINDS[entry.kind].unshard(shards, arch)
