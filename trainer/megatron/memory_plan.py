"""Per-GPU memory of a GLM-4.x job under a megatron parallel plan (params, grads, optimizer
state, activations) -- `physarum plan CONFIG` prints it. Needs neither torch nor megatron.

Model of the memory, per pipeline stage (bytes; t = TP, e = expert TP, c = CP):
  parameters   counted exactly from the GLM shape (embedding on the first stage, output layer
               on the last, first_k_dense dense layers where they fall, experts / EP per rank)
  weights      params x 2 (bf16) or 4 (fp32)
  grads        params x 4 (megatron DDP accumulates and reduces grads in fp32)
  optimizer    fp32 main params (bf16 training only) + Adam m and v = 12 (or 8) bytes/param;
               the distributed optimizer shards dense params over DP = world/(t*pp*c) and
               expert params over expert-DP = world/(pp*ep*e); cpu_adam moves it to the host
  activations  per token of a micro-batch (micro_batch_tokens / c tokens per rank), per layer,
               what backward keeps (bf16): with sequence parallelism every [token, hidden]
               tensor is split over t. Attention: norm input and qkv input (h), q/k before
               the qk-norm ((nh+nkv)*hd), q/k/v after RoPE ((nh+2nkv)*hd), attention output
               (nh*hd), flash attention (no [s, s] scores). Dense MLP: 2h + 3*ffn (SwiGLU keeps
               fc1's [gate, up] and the activation). MoE: 2h, router scores (E fp32), k routed
               copies of (2h + 3*F) per token spread over the EP group (balanced load), the
               shared expert's h + 3*Fs. Full recompute keeps only each layer's input (h) plus
               one layer's activations at the backward peak. 1F1B keeps min(pp - stage, n_mb)
               micro-batches in flight on a stage.
  logits       last stage: [tokens, V/t] in bf16 from the output layer plus three fp32 copies
               in the vocab-parallel logprob/entropy (logprobs.py)
Not modelled: allocator fragmentation, NCCL/TE workspaces, the CUDA context (~1-3 GB), the
rollout engine when colocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.services import MegatronConfig, TrainerConfig
from trainer.megatron.arch import GlmArch

GB = 1024**3
_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on besides the architecture."""

    par: MegatronConfig
    world_size: int
    dtype: str = "bfloat16"
    micro_batch_tokens: int = 16384
    num_microbatches: int = 8

    @property
    def dp(self) -> int:
        return self.world_size // (self.par.tp * self.par.pp * self.par.cp)

    @property
    def expert_tp(self) -> int:
        return self.par.tp if self.par.ep == 1 else self.par.expert_tp

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.par.pp * self.par.ep * self.expert_tp)


@dataclass
class StageMemory:
    """Memory of one GPU of pipeline stage `stage`, in bytes (host: CPU-Adam state)."""

    stage: int
    dense_layers: int
    moe_layers: int
    dense_params: int
    expert_params: int
    parts: dict[str, float] = field(default_factory=dict)
    host_bytes: float = 0.0

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _attention_params(a: GlmArch, tp: int) -> int:
    qkv_rows = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    per_tp = qkv_rows * a.hidden_size + a.num_heads * a.head_dim * a.hidden_size
    per_tp += qkv_rows if a.qkv_bias else 0
    replicated = 2 * a.hidden_size + (2 * a.head_dim if a.qk_norm else 0)
    return per_tp // tp + replicated


def _layer_params(a: GlmArch, p: PlanInputs, moe: bool) -> tuple[int, int]:
    """(dense params, expert params) of one layer on one rank."""
    tp = p.par.tp
    if not moe:
        return _attention_params(a, tp) + 3 * a.hidden_size * a.ffn_hidden_size // tp, 0
    router = a.num_experts * a.hidden_size  # the expert bias is a buffer, not a parameter
    shared = 3 * a.hidden_size * a.shared_ffn_hidden_size // tp
    experts = a.num_experts // p.par.ep * 3 * a.hidden_size * a.moe_ffn_hidden_size // p.expert_tp
    return _attention_params(a, tp) + router + shared, experts


def _sp(par: MegatronConfig) -> int:
    """How many ways [token, hidden] activations are split: tp under sequence parallelism."""
    on = par.tp > 1 if par.sequence_parallel is None else par.sequence_parallel
    return par.tp if on else 1


def layer_activation_bytes(a: GlmArch, p: PlanInputs, moe: bool) -> float:
    """Bytes per token that backward keeps for one layer on one rank (no recompute)."""
    sp, t = _sp(p.par), p.par.tp
    heads = (a.num_heads + a.num_kv_heads) + (a.num_heads + 2 * a.num_kv_heads) + a.num_heads
    act = 2.0 * (2 * a.hidden_size / sp + heads * a.head_dim / t)
    if not moe:
        return act + 2.0 * (2 * a.hidden_size / sp + 3 * a.ffn_hidden_size / t)
    h, e = a.hidden_size, p.expert_tp
    act += 2.0 * 2 * h / sp + 4.0 * a.num_experts / sp  # norm in, router in, fp32 scores
    act += 2.0 * a.topk * e * (2 * h + 3 * a.moe_ffn_hidden_size / e) / sp  # routed copies
    act += 2.0 * (h / sp + 3 * a.shared_ffn_hidden_size / t)  # shared expert
    return act


def _stage_layers(a: GlmArch, pp: int, stage: int) -> list[int]:
    per = a.num_layers // pp
    return a.moe_layer_pattern[stage * per : (stage + 1) * per]


def stage_memory(a: GlmArch, p: PlanInputs, stage: int) -> StageMemory:
    """The memory of one GPU in pipeline stage `stage` (see the module docstring)."""
    par, pattern = p.par, _stage_layers(a, p.par.pp, stage)
    dense = expert = 0
    for is_moe in pattern:
        d, x = _layer_params(a, p, bool(is_moe))
        dense, expert = dense + d, expert + x
    first, last = stage == 0, stage == par.pp - 1
    embed = a.vocab_size * a.hidden_size // par.tp
    dense += embed if first else 0
    dense += a.hidden_size if last else 0
    dense += embed if last and (not a.tie_word_embeddings or par.pp > 1) else 0
    mem = StageMemory(stage, pattern.count(0), pattern.count(1), dense, expert)
    weight_bytes = _DTYPE_BYTES[p.dtype]
    optim_bytes = 8 + (4 if weight_bytes == 2 else 0)
    shard = (dense / p.dp + expert / p.expert_dp) if par.distributed_optimizer else mem.params
    optimizer = shard * optim_bytes
    mem.parts["weights"] = mem.params * weight_bytes
    mem.parts["grads"] = mem.params * 4.0
    mem.parts["optimizer"] = 0.0 if par.cpu_adam else optimizer
    mem.host_bytes = optimizer if par.cpu_adam else 0.0
    tokens = p.micro_batch_tokens / par.cp
    per_layer = [layer_activation_bytes(a, p, bool(m)) for m in pattern] or [0.0]
    sp = _sp(par)
    if par.recompute:
        kept = len(pattern) * 2.0 * a.hidden_size / sp + max(per_layer)
    else:
        kept = sum(per_layer)
    in_flight = min(par.pp - stage, p.num_microbatches)
    mem.parts["activations"] = tokens * kept * in_flight
    mem.parts["logits"] = tokens * a.vocab_size / par.tp * (2 + 3 * 4) if last else 0.0
    return mem


def memory_plan(a: GlmArch, p: PlanInputs) -> list[StageMemory]:
    """One StageMemory per pipeline stage."""
    if p.world_size % (p.par.tp * p.par.pp * p.par.cp):
        raise ValueError(f"world size {p.world_size} is not divisible by tp*pp*cp")
    if a.num_layers % p.par.pp:
        raise ValueError(f"num_hidden_layers {a.num_layers} is not divisible by pp {p.par.pp}")
    return [stage_memory(a, p, s) for s in range(p.par.pp)]


def render(a: GlmArch, p: PlanInputs, gpu_gb: float = 80.0) -> str:
    """A printable table of memory_plan (GiB per GPU) with a fit verdict against gpu_gb."""
    par = p.par
    stages = memory_plan(a, p)
    lines = [
        f"world {p.world_size}: tp {par.tp} (sp {_sp(par) > 1})"
        f" x pp {par.pp} x cp {par.cp} x dp {p.dp}; ep {par.ep}, expert tp {p.expert_tp},"
        f" expert dp {p.expert_dp}; {p.dtype}; distributed optimizer {par.distributed_optimizer};"
        f" cpu adam {par.cpu_adam}; recompute {par.recompute}",
        f"micro-batch {p.micro_batch_tokens} tokens, {p.num_microbatches} micro-batches per step",
        "stage  layers(d+moe)  params(B)  weights  grads  optimizer  activations  logits"
        "   total GiB  (host GiB)",
    ]
    for s in stages:
        parts = [
            s.parts[k] / GB for k in ("weights", "grads", "optimizer", "activations", "logits")
        ]
        lines.append(
            f"{s.stage:>5}  {s.dense_layers:>5}+{s.moe_layers:<7} {s.params / 1e9:>9.2f}  "
            + "  ".join(f"{x:>{w}.1f}" for x, w in zip(parts, (7, 5, 9, 11, 6)))
            + f"  {s.total / GB:>10.1f}  ({s.host_bytes / GB:.1f})"
        )
    worst = max(stages, key=lambda s: s.total)
    verdict = "fits" if worst.total / GB <= gpu_gb else "does NOT fit"
    lines.append(
        f"peak {worst.total / GB:.1f} GiB on stage {worst.stage}: {verdict} in {gpu_gb:g} GiB"
    )
    return "\n".join(lines)


def render_for_trainer(
    model_config: object, trainer: TrainerConfig, *, num_microbatches: int = 8, gpu_gb: float = 80.0
) -> str:
    """`render` for a job's trainer section: world = trainer.num_ranks, micro-batches of
    trainer.micro_batch_tokens tokens in trainer.dtype. model_config: an HF-style GLM config
    (models.ModelConfig, a config.json dict, or a GlmArch)."""
    arch = model_config if isinstance(model_config, GlmArch) else GlmArch.from_hf(model_config)
    plan = PlanInputs(
        trainer.megatron,
        trainer.num_ranks,
        dtype=trainer.dtype,
        micro_batch_tokens=trainer.micro_batch_tokens,
        num_microbatches=num_microbatches,
    )
    return render(arch, plan, gpu_gb)
