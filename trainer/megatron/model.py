"""Build megatron-core's GPTModel for GLM-4.x: process groups, TransformerConfig, the model.

`init_parallel` sets up megatron's (global) parallel state from a `MegatronConfig`;
`transformer_config` maps a `GlmArch` plus the parallel plan to a megatron
`TransformerConfig`; `build_model` returns this pipeline stage's `GPTModel`.

Mapping of GLM-4.x onto megatron (HF key -> megatron):
  num_key_value_heads -> num_query_groups (GQA), head_dim -> kv_channels,
  use_qk_norm -> qk_layernorm, attention_bias -> add_qkv_bias (no other linear bias),
  partial_rotary_factor -> rotary_percent, rope_theta -> rotary_base,
  first_k_dense_replace -> moe_layer_freq = [0]*k + [1]*(L-k),
  n_routed_experts / num_experts_per_tok / moe_intermediate_size -> num_moe_experts /
  moe_router_topk / moe_ffn_hidden_size, n_shared_experts * moe_intermediate_size ->
  moe_shared_expert_intermediate_size, routed_scaling_factor ->
  moe_router_topk_scaling_factor, sigmoid scores + e_score_correction_bias ->
  moe_router_score_function="sigmoid" + moe_router_enable_expert_bias (the bias is updated
  in finalize_model_grads at `moe_router_bias_update_rate`), n_group/topk_group ->
  moe_router_num_groups/moe_router_group_topk, router in fp32 (as HF) -> moe_router_dtype.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from configs.services import MegatronConfig
from trainer.megatron.arch import GlmArch
from trainer.megatron.spec import glm4_block_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sequence_parallel(par: MegatronConfig) -> bool:
    """Megatron demands sequence parallelism for MoE with TP > 1; null means 'when tp > 1'."""
    return par.tp > 1 if par.sequence_parallel is None else par.sequence_parallel


def expert_tp(par: MegatronConfig) -> int:
    """Effective expert tensor parallelism: `par.expert_tp`, but `par.tp` when ep == 1.

    megatron-core 0.16 reduces expert gradients over the expert-data-parallel group only when
    ep > 1; with ep == 1 it treats experts as dense parameters (reduced over the dense DP
    group), which is right only if the experts are split over TP like the dense layers.
    """
    return par.tp if par.ep == 1 else par.expert_tp


def check_plan(arch: GlmArch, par: MegatronConfig, world_size: int) -> None:
    """Raise ValueError naming the field when the parallel plan does not fit the model."""
    model_parallel = par.tp * par.pp * par.cp
    problems = [
        (world_size % model_parallel, f"world size {world_size} divisible by tp*pp*cp"),
        (
            world_size % (par.pp * par.ep * expert_tp(par)),
            "world size divisible by pp*ep*expert_tp",
        ),
        (arch.num_kv_heads % par.tp, f"tp ({par.tp}) dividing num_key_value_heads"),
        (arch.vocab_size % par.tp, f"tp ({par.tp}) dividing vocab_size ({arch.vocab_size})"),
        (arch.num_experts % par.ep, f"ep ({par.ep}) dividing n_routed_experts"),
        (arch.num_layers % par.pp, f"pp ({par.pp}) dividing num_hidden_layers"),
        (par.tp > 1 and not sequence_parallel(par), "sequence_parallel on for MoE with tp > 1"),
        (par.cp > 1, "cp 1 (context parallelism is not implemented by this backend yet)"),
        (
            par.grouped_gemm and not par.transformer_engine,
            "grouped_gemm only with transformer_engine",
        ),
    ]
    for failed, expected in problems:
        if failed:
            raise ValueError(f"trainer.megatron: expected {expected}")


def ensure_process_group() -> None:
    """A one-process group (gloo, or NCCL when CUDA is available) if none exists yet: megatron
    needs torch.distributed even on a single rank."""
    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def init_parallel(par: MegatronConfig, seed: int) -> None:
    """Initialise megatron's process groups and its model-parallel RNG tracker.

    torch.distributed must already be initialised (gloo on a CPU, NCCL on GPUs).
    """
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=expert_tp(par),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _moe_kwargs(arch: GlmArch, par: MegatronConfig, bias_update_rate: float, aux: float) -> dict:
    grouped = arch.n_group > 1
    return dict(
        num_moe_experts=arch.num_experts,
        moe_layer_freq=arch.moe_layer_pattern,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.shared_ffn_hidden_size or None,
        moe_router_topk=arch.topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=bias_update_rate,
        moe_router_topk_scaling_factor=arch.routed_scaling_factor,
        moe_router_num_groups=arch.n_group if grouped else None,
        moe_router_group_topk=arch.topk_group if grouped else None,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_token_dispatcher_type=par.dispatcher,
        moe_grouped_gemm=par.grouped_gemm,
    )


def _parallel_kwargs(par: MegatronConfig) -> dict:
    recompute = (
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        if par.recompute
        else {}
    )
    return dict(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=expert_tp(par),
        sequence_parallel=sequence_parallel(par),
        variable_seq_lengths=True,
        **recompute,
    )


def transformer_config(
    arch: GlmArch,
    par: MegatronConfig,
    *,
    dtype: str = "float32",
    bias_update_rate: float = 1e-3,
    aux_loss_coef: float = 0.0,
) -> TransformerConfig:
    """The megatron TransformerConfig for `arch` under the parallel plan `par`."""
    params_dtype = DTYPES[dtype]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        init_method_std=0.02,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        transformer_impl="transformer_engine" if par.transformer_engine else "local",
        **_moe_kwargs(arch, par, bias_update_rate, aux_loss_coef),
        **_parallel_kwargs(par),
    )


def build_model(arch: GlmArch, config: TransformerConfig, impl: str = "local") -> GPTModel:
    """This pipeline stage's GPTModel (embedding on the first stage, head on the last)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=glm4_block_spec(config, arch.moe_layer_pattern, impl),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=arch.rotary_percent,
        rotary_base=arch.rope_theta,
    )
