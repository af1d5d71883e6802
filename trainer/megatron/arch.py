"""The GLM-4.x MoE architecture numbers, read once from a Hugging Face style config.

`GlmArch` is the single place where HF `config.json` keys (as in `Glm4MoeForCausalLM`) are
interpreted for the megatron backend: the model builder, the weight conversion and the
memory plan all take a `GlmArch`. It imports neither torch nor megatron, so the memory plan
can run anywhere.

Accepted sources: any object with HF config attributes (our `models.config.ModelConfig`,
`transformers.Glm4MoeConfig`) or a plain dict of config.json keys. RoPE settings are read
from the top-level keys (`rope_theta`, `partial_rotary_factor`, as in GLM-4.6's config.json)
or from a transformers-5 `rope_parameters` dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ArchError(ValueError):
    """A config that the megatron backend cannot represent; the message names the key."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _rope(config: Any, key: str, default: Any) -> Any:
    value = _get(config, key)
    if value is not None:
        return value
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    return params.get(key, default) if isinstance(params, Mapping) else default


@dataclass(frozen=True)
class GlmArch:
    """GLM-4.x MoE shape; field comments give the HF config.json key."""

    vocab_size: int  # vocab_size
    hidden_size: int  # hidden_size
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (default hidden_size // num_attention_heads)
    ffn_hidden_size: int  # intermediate_size (dense layers)
    moe_ffn_hidden_size: int  # moe_intermediate_size (one routed expert)
    num_experts: int  # n_routed_experts
    num_shared_experts: int  # n_shared_experts
    topk: int  # num_experts_per_tok
    first_k_dense: int  # first_k_dense_replace
    routed_scaling_factor: float  # routed_scaling_factor
    norm_topk_prob: bool  # norm_topk_prob
    n_group: int  # n_group
    topk_group: int  # topk_group
    rotary_percent: float  # partial_rotary_factor
    rope_theta: float  # rope_theta
    norm_eps: float  # rms_norm_eps
    max_position_embeddings: int  # max_position_embeddings
    tie_word_embeddings: bool  # tie_word_embeddings
    qkv_bias: bool  # attention_bias
    qk_norm: bool  # use_qk_norm

    @classmethod
    def from_hf(cls, config: Any) -> GlmArch:
        """Read an HF-style config (object or dict); raises ArchError on what we cannot map."""
        hidden = int(_get(config, "hidden_size"))
        heads = int(_get(config, "num_attention_heads"))
        arch = cls(
            vocab_size=int(_get(config, "vocab_size")),
            hidden_size=hidden,
            num_layers=int(_get(config, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(config, "num_key_value_heads", heads)),
            head_dim=int(_get(config, "head_dim", None) or hidden // heads),
            ffn_hidden_size=int(_get(config, "intermediate_size")),
            moe_ffn_hidden_size=int(_get(config, "moe_intermediate_size")),
            num_experts=int(_get(config, "n_routed_experts")),
            num_shared_experts=int(_get(config, "n_shared_experts", 0) or 0),
            topk=int(_get(config, "num_experts_per_tok")),
            first_k_dense=int(_get(config, "first_k_dense_replace", 0)),
            routed_scaling_factor=float(_get(config, "routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(_get(config, "norm_topk_prob", True)),
            n_group=int(_get(config, "n_group", 1) or 1),
            topk_group=int(_get(config, "topk_group", 1) or 1),
            rotary_percent=float(_rope(config, "partial_rotary_factor", 0.5)),
            rope_theta=float(_rope(config, "rope_theta", 10000.0)),
            norm_eps=float(_get(config, "rms_norm_eps", 1e-5)),
            max_position_embeddings=int(_get(config, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            qkv_bias=bool(_get(config, "attention_bias", False)),
            qk_norm=bool(_get(config, "use_qk_norm", False)),
        )
        arch.check()
        return arch

    def check(self) -> None:
        """Raise ArchError for a shape megatron's GPTModel cannot express exactly."""
        act = None
        if self.num_heads % self.num_kv_heads:
            act = f"num_attention_heads ({self.num_heads}) divisible by num_key_value_heads"
        elif not 0 <= self.first_k_dense <= self.num_layers:
            act = f"first_k_dense_replace ({self.first_k_dense}) within [0, num_hidden_layers]"
        elif self.topk > self.num_experts:
            act = f"num_experts_per_tok ({self.topk}) <= n_routed_experts ({self.num_experts})"
        elif not self.norm_topk_prob and self.topk > 1:
            act = "norm_topk_prob true (megatron's sigmoid router always renormalises top-k)"
        elif self.n_group > 1 and self.topk // self.topk_group != 2:
            # megatron scores a group by its top-(topk/topk_group) experts, HF by its top-2.
            act = "num_experts_per_tok / topk_group == 2 when n_group > 1"
        elif self.n_group > 1 and self.num_experts % self.n_group:
            act = f"n_routed_experts divisible by n_group ({self.n_group})"
        if act is not None:
            raise ArchError(f"GLM config: expected {act}")

    @property
    def moe_layer_pattern(self) -> list[int]:
        """Per layer: 0 = dense MLP, 1 = MoE (megatron's `moe_layer_freq` list)."""
        return [0 if i < self.first_k_dense else 1 for i in range(self.num_layers)]

    @property
    def shared_ffn_hidden_size(self) -> int:
        """Intermediate size of the (fused) shared expert."""
        return self.moe_ffn_hidden_size * self.num_shared_experts
