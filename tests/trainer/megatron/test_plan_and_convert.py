"""In-process tests (no megatron process groups): GlmArch, the conversion rules, the memory plan.

The conversion rules are checked against layouts written out independently here (megatron's
per-group QKV interleave and per-rank [gate; up] halves), and shard -> unshard is the identity
for every rule and TP size. The memory plan's parameter count must equal the torch model's
(models.count_params), its sharding must add up over the ranks, and at slime's published
GLM-4.5 layout it must reproduce slime's need for CPU Adam.
"""

from __future__ import annotations

import pytest
import torch

from configs.services import MegatronConfig
from models import count_params, get_preset
from trainer.megatron.arch import ArchError, GlmArch
from trainer.megatron.convert import KINDS, RankLayout, entries, names_key, shard, unshard
from trainer.megatron.memory_plan import GB, PlanInputs, memory_plan, render

TINY = GlmArch.from_hf(get_preset("glm4moe-tiny", attention_bias=True))
GLM46 = GlmArch.from_hf(get_preset("glm-4.6"))


def test_arch_reads_glm46_config() -> None:
    a = GLM46
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (
        92, 5120, 96, 8, 128,
    )  # fmt: skip
    assert (a.num_experts, a.topk, a.first_k_dense, a.routed_scaling_factor) == (160, 8, 3, 2.5)
    assert a.rotary_percent == 0.5 and a.rope_theta == 1e6 and a.qkv_bias and a.qk_norm
    assert a.moe_layer_pattern == [0, 0, 0] + [1] * 89
    # a transformers-5 style config with rope settings nested in rope_parameters
    nested = dict(get_preset("glm4moe-tiny").__dict__)
    nested.pop("rope_theta"), nested.pop("partial_rotary_factor")
    nested["rope_parameters"] = {"rope_theta": 5e5, "partial_rotary_factor": 0.25}
    arch = GlmArch.from_hf(nested)
    assert (arch.rope_theta, arch.rotary_percent) == (5e5, 0.25)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"num_attention_heads": 3}, "num_key_value_heads"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
    ],
)
def test_arch_rejects_what_megatron_cannot_express(override: dict, needle: str) -> None:
    config = dict(get_preset("glm4moe-tiny").__dict__) | override
    with pytest.raises(ArchError, match=needle):
        GlmArch.from_hf(config)


def _interleaved_qkv(q, k, v, groups: int) -> torch.Tensor:
    """megatron's fused layout written out: for each group, its q heads, then k, then v."""
    per_q = q.shape[0] // groups
    per_kv = k.shape[0] // groups
    rows = []
    for g in range(groups):
        rows += [q[g * per_q : (g + 1) * per_q], k[g * per_kv : (g + 1) * per_kv]]
        rows += [v[g * per_kv : (g + 1) * per_kv]]
    return torch.cat(rows)


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_rule_matches_megatron_layout(tp: int) -> None:
    a = TINY
    q = torch.randn(a.num_heads * a.head_dim, a.hidden_size)
    k, v = (torch.randn(a.num_kv_heads * a.head_dim, a.hidden_size) for _ in range(2))
    full = _interleaved_qkv(q, k, v, a.num_kv_heads)
    pieces = [KINDS["qkv"].fuse_shard([q, k, v], r, tp, a) for r in range(tp)]
    assert torch.equal(torch.cat(pieces), full)  # TP splits whole query groups
    assert all(torch.equal(x, y) for x, y in zip(KINDS["qkv"].unshard(pieces, a), (q, k, v)))
    bias = [torch.randn(t.shape[0]) for t in (q, k, v)]
    bias_pieces = [KINDS["qkv"].fuse_shard(bias, r, tp, a) for r in range(tp)]
    assert torch.equal(torch.cat(bias_pieces), _interleaved_qkv(*bias, a.num_kv_heads))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_rule_gives_each_rank_its_halves(tp: int) -> None:
    gate, up = torch.randn(8, 6), torch.randn(8, 6)
    pieces = [KINDS["gate_up"].fuse_shard([gate, up], r, tp, TINY) for r in range(tp)]
    for r, piece in enumerate(pieces):
        rows = 8 // tp
        # megatron's SwiGLU chunks each rank's fc1 output in two: gate half, then up half
        assert torch.equal(piece[:rows], gate[r * rows : (r + 1) * rows])
        assert torch.equal(piece[rows:], up[r * rows : (r + 1) * rows])
    restored = KINDS["gate_up"].unshard(pieces, TINY)
    assert torch.equal(restored[0], gate) and torch.equal(restored[1], up)


@pytest.mark.parametrize("kind", ["replicated", "column", "row"])
def test_simple_rules_round_trip(kind: str) -> None:
    x = torch.randn(8, 4)
    pieces = [KINDS[kind].fuse_shard([x], r, 2, TINY) for r in range(2)]
    assert torch.equal(KINDS[kind].unshard(pieces, TINY)[0], x)


@pytest.mark.parametrize("impl", ["local", "te", "te_grouped"])
def test_entries_cover_every_hf_tensor_once_across_a_layout(impl: str) -> None:
    """Over all ranks of PP2 x EP2, the entries name every HF tensor of the torch model, once,
    whichever spec's megatron names (local, TransformerEngine, TE grouped experts)."""
    from models import Glm4MoeForCausalLM

    config = get_preset("glm4moe-tiny", num_hidden_layers=4, tie_word_embeddings=False)
    hf_names = {name for name, _ in Glm4MoeForCausalLM(config).hf_state_dict()}
    arch = GlmArch.from_hf(config)
    covered: list[str] = []
    for stage in range(2):
        for ep_rank in range(2):
            layout = RankLayout(2 * stage, 2, stage == 0, stage == 1, ep_rank, 2)
            megatron_names = [e.megatron for e in entries(arch, layout, impl)]
            assert len(set(megatron_names)) == len(megatron_names)
            for entry in entries(arch, layout, impl):
                expert = None if entry.expert is None else ep_rank * 2 + entry.expert
                if entry.expert is not None or ep_rank == 0:
                    covered += entry.hf_names(expert)
    assert sorted(covered) == sorted(hf_names)


def test_names_key_follows_the_spec_switches() -> None:
    assert names_key(False, False) == "local"
    assert names_key(True, False) == "te"
    assert names_key(True, True) == "te_grouped"


def test_shard_unshard_identity_through_entries() -> None:
    layout = RankLayout(0, TINY.num_layers, True, True)
    for entry in entries(TINY, layout)[:8]:
        hf = [torch.randn(8 * TINY.num_kv_heads, 4) for _ in entry.hf]
        if entry.kind == "qkv":
            hf[0] = torch.randn(TINY.num_heads * TINY.head_dim, 4)
            hf[1:] = [torch.randn(TINY.num_kv_heads * TINY.head_dim, 4) for _ in range(2)]
        pieces = [shard(entry, hf, TINY, r, 2) for r in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(unshard(entry, pieces, TINY), hf))


def test_plan_counts_exactly_the_models_parameters() -> None:
    total, _ = count_params(get_preset("glm-4.6"))
    (stage,) = memory_plan(GLM46, PlanInputs(MegatronConfig(), world_size=1))
    assert stage.params == total


def test_plan_shards_add_up_over_ranks() -> None:
    par = MegatronConfig(tp=8, pp=4, ep=16, distributed_optimizer=True)
    plan = PlanInputs(par, world_size=128)
    stages = memory_plan(GLM46, plan)
    total, _ = count_params(get_preset("glm-4.6"))
    experts = sum(s.expert_params for s in stages) * par.ep  # expert tp 1: whole experts
    assert experts == GLM46.num_experts * 3 * GLM46.hidden_size * GLM46.moe_ffn_hidden_size * 89
    # per-rank optimizer shard: dense over DP 4, experts over expert-DP 2 (12 bytes/param)
    s = stages[1]
    assert s.parts["optimizer"] == pytest.approx(12 * (s.dense_params / 4 + s.expert_params / 2))
    assert sum(s.dense_params for s in stages) < total / 8  # dense part is TP-split


def test_plan_reproduces_slime_glm45_need_for_cpu_adam() -> None:
    """slime's run-glm4.5-355B-A32B.sh: 64 GPUs, TP 8 + SP, PP 4, CP 2, EP 16, expert TP 1,
    full recompute, 16384 tokens per GPU, --optimizer-cpu-offload. Without the offload the
    Adam state of ~6B params per GPU (DP 1: no sharding) cannot fit in 80 GB; with it, it fits."""
    layout = dict(tp=8, pp=4, cp=2, ep=16, expert_tp=1, sequence_parallel=True, recompute=True)
    peaks = {}
    for cpu_adam in (False, True):
        par = MegatronConfig(**layout, distributed_optimizer=True, cpu_adam=cpu_adam)
        plan = PlanInputs(par, world_size=64, micro_batch_tokens=2 * 16384)
        peaks[cpu_adam] = max(s.total for s in memory_plan(GLM46, plan)) / GB
    assert peaks[False] > 80 > peaks[True]
    text = render(GLM46, PlanInputs(MegatronConfig(**layout, cpu_adam=True), 64, "bfloat16"))
    assert "fits in 80 GiB" in text and "does NOT" not in text
