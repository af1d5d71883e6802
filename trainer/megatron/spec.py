"""Megatron layer specs for GLM-4.x: the first-k dense layers, then MoE layers.

Every layer is pre-norm: RMSNorm -> self-attention (GQA, fused QKV, optional QKV bias,
per-head RMSNorm on q and k, partial RoPE applied by megatron from `rotary_percent`) ->
residual -> RMSNorm -> MLP (dense SwiGLU) or MoE (sigmoid router with expert bias,
SwiGLU experts, a shared SwiGLU expert) -> residual.

Two implementations, picked by `MegatronConfig.transformer_engine` through `SPEC_BUILDERS`:

* "local" (default; runs on a CPU): megatron-core's own linears (`ColumnParallelLinear`,
  `RowParallelLinear`), experts as `SequentialMLP`, our `RMSNorm` (sequence-parallel capable,
  see norm.py) and our `PackedCausalAttention` (packed THD sequences without TE, see
  core_attention.py). Tested here at TP/EP/PP 2.
* "te" (GPU): megatron's TransformerEngine spec -- TE linears with the input norm fused into
  `linear_qkv` / the dense `linear_fc1`, TE flash attention for THD, `TEGroupedMLP` experts
  when `grouped_gemm` is on -- with TENorm as the final norm. Not runnable on this machine;
  conversion knows its parameter names (convert.py, `PARAM_NAMES["te"]`).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from trainer.megatron.core_attention import PackedCausalAttention
from trainer.megatron.norm import RMSNorm


def _swiglu() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _local_layer(config: TransformerConfig, moe: bool) -> ModuleSpec:
    qk_norm = RMSNorm if config.qk_layernorm else IdentityOp
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=PackedCausalAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    if moe:
        mlp = ModuleSpec(
            module=MoELayer,
            submodules=MoESubmodules(
                experts=ModuleSpec(module=SequentialMLP, submodules=_swiglu()),
                shared_experts=(
                    ModuleSpec(module=SharedExpertMLP, submodules=_swiglu())
                    if config.moe_shared_expert_intermediate_size
                    else None
                ),
            ),
            metainfo={"fuse_pre_mlp_layernorm": False},
        )
    else:
        mlp = ModuleSpec(module=MLP, submodules=_swiglu())
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _local_specs(config: TransformerConfig, pattern: list[int]) -> tuple[list[ModuleSpec], type]:
    dense, moe = _local_layer(config, moe=False), _local_layer(config, moe=True)
    return [moe if is_moe else dense for is_moe in pattern], RMSNorm


def _te_specs(config: TransformerConfig, pattern: list[int]) -> tuple[list[ModuleSpec], type]:
    # Imported lazily: megatron's TE extension needs transformer_engine (GPU images only).
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    def layer(num_experts):
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )

    dense, moe = layer(None), layer(config.num_moe_experts)
    return [moe if is_moe else dense for is_moe in pattern], TENorm


SPEC_BUILDERS: dict[str, Callable[[TransformerConfig, list[int]], tuple[list[ModuleSpec], type]]]
SPEC_BUILDERS = {"local": _local_specs, "te": _te_specs}


def glm4_block_spec(
    config: TransformerConfig, pattern: list[int], impl: str = "local"
) -> TransformerBlockSubmodules:
    """The decoder block spec of this pipeline stage.

    Args:
      config: the megatron TransformerConfig (its PP rank decides which layers are built).
      pattern: one entry per global layer, 0 = dense MLP, 1 = MoE (GlmArch.moe_layer_pattern).
      impl: "local" or "te" (a key of SPEC_BUILDERS).
    """
    if impl not in SPEC_BUILDERS:
        raise ValueError(f"spec impl {impl!r}: expected one of {sorted(SPEC_BUILDERS)}")
    if len(pattern) != config.num_layers:
        raise ValueError(f"moe pattern has {len(pattern)} entries, num_layers={config.num_layers}")
    specs, final_norm = SPEC_BUILDERS[impl](config, pattern)
    offset = get_transformer_layer_offset(config)
    count = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count], layer_norm=final_norm
    )
