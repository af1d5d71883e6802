"""The GLM-4.x MoE architecture config (field names are the keys of HF's config.json) and presets.

`ModelConfig` reads and writes the `config.json` of a Hugging Face `Glm4MoeForCausalLM`
checkpoint (model_type `glm4_moe`): GLM-4.5/4.6 hub configs load as they are, and what
`to_hf_dict` writes loads in transformers. Presets name the three models Physarum uses:
`glm4moe-toy` (laptop RL, ~1.8M params), `glm4moe-tiny` (unit tests) and `glm-4.6`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"

# Keys of a config.json that carry no architecture (HF bookkeeping, generation defaults of old
# PretrainedConfig versions, quantization handled by models.checkpoint). Ignored on load.
_BOOKKEEPING_KEYS = frozenset(
    {
        "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
        "_name_or_path", "use_cache", "output_router_logits", "router_aux_loss_coef",
        "quantization_config", "return_dict", "output_hidden_states", "output_attentions",
        "torchscript", "use_bfloat16", "tie_encoder_decoder", "chunk_size_feed_forward",
        "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
        "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "finetuning_task", "pruned_heads",
        "tf_legacy_loss", "use_return_dict", "num_labels", "max_length", "min_length",
        "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "attn_implementation", "_attn_implementation_autoset", "mlp_layer_types",
    }
)  # fmt: skip


@dataclass
class ModelConfig:
    """Architecture of a GLM-4.x MoE causal LM; every field is a key of HF's config.json."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512  # dense (first_k_dense_replace) layers' MLP width
    moe_intermediate_size: int = 128  # each routed / shared expert's MLP width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    partial_rotary_factor: float = 0.5  # RoPE on the first head_dim * factor dims of a head
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    use_qk_norm: bool = True  # RMSNorm over head_dim on q and k, before RoPE
    attention_bias: bool = False  # biases on q/k/v projections (o_proj never has one)
    first_k_dense_replace: int = 1  # layers [0, k) are dense, the rest MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_dropout: float = 0.0  # accepted for compatibility; Physarum never drops out
    num_nextn_predict_layers: int = 0  # MTP layers (models/mtp.py): loaded, saved, SFT-trainable

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived ---------------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE decoder layers, in order (the rows of expert_load etc.)."""
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    # --- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict; bookkeeping keys are ignored, unknown keys rejected."""
        d = dict(d)
        model_type = d.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json model_type: expected {MODEL_TYPE!r}, got {model_type!r}")
        _absorb_rope(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _BOOKKEEPING_KEYS)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"config.json: unknown key(s) {', '.join(hints)}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as Glm4MoeForCausalLM."""
        d = dataclasses.asdict(self)
        d["architectures"] = [ARCHITECTURE]
        d["model_type"] = MODEL_TYPE
        # transformers 5 keeps RoPE settings in rope_parameters; older readers (SGLang's
        # transformers, GLM hub configs) use the top-level keys. Write both, consistently.
        d["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        d["rope_scaling"] = None
        d["use_cache"] = True
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        """Read `<directory>/config.json`."""
        path = Path(directory) / CONFIG_NAME
        with open(path) as f:
            try:
                return cls.from_hf_dict(json.load(f))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write `<directory>/config.json`; `extra` adds keys (e.g. quantization_config)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        d = self.to_hf_dict() | (extra or {})
        with open(Path(directory) / CONFIG_NAME, "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")


def _absorb_rope(d: dict[str, Any]) -> None:
    """Fold transformers-5 `rope_parameters` / legacy `rope_scaling` into the flat fields."""
    rope = d.pop("rope_parameters", None) or {}
    scaling = d.pop("rope_scaling", None)
    for source in (rope, scaling or {}):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json rope type {rope_type!r}: only 'default' is supported")
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            if key in d and float(d[key]) != float(rope[key]):
                raise ValueError(f"config.json: {key}={d[key]} disagrees with rope_parameters")
            d[key] = rope[key]


_INT_FIELDS_MIN = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2,
    "max_position_embeddings": 1, "first_k_dense_replace": 0, "n_routed_experts": 1,
    "n_shared_experts": 0, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
    "num_nextn_predict_layers": 0,
}  # fmt: skip


def _validate(c: ModelConfig) -> None:
    for name, low in _INT_FIELDS_MIN.items():
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"ModelConfig.{name}: expected an int >= {low}, got {value!r}")
    for name in ("partial_rotary_factor", "rope_theta", "rms_norm_eps", "routed_scaling_factor"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"ModelConfig.{name}: expected a positive number, got {value!r}")
    if c.hidden_act != "silu":
        raise ValueError(f"ModelConfig.hidden_act: only 'silu' is supported, got {c.hidden_act!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ValueError(
            f"ModelConfig.num_attention_heads={c.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={c.num_key_value_heads}"
        )
    if c.partial_rotary_factor > 1 or c.rotary_dim % 2 or c.rotary_dim == 0:
        raise ValueError(
            f"ModelConfig.partial_rotary_factor={c.partial_rotary_factor}: head_dim*factor must be"
            f" a positive even number <= head_dim={c.head_dim}"
        )
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise ValueError("ModelConfig.first_k_dense_replace: must be <= num_hidden_layers")
    _validate_routing(c)


def _validate_routing(c: ModelConfig) -> None:
    if c.n_routed_experts % c.n_group:
        raise ValueError(
            f"ModelConfig.n_group={c.n_group} must divide n_routed_experts={c.n_routed_experts}"
        )
    if c.topk_group > c.n_group:
        raise ValueError(f"ModelConfig.topk_group={c.topk_group} must be <= n_group={c.n_group}")
    per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1 and per_group < 2:
        raise ValueError("ModelConfig.n_group: group scores need >= 2 experts per group")
    if c.num_experts_per_tok > c.topk_group * per_group:
        raise ValueError(
            f"ModelConfig.num_experts_per_tok={c.num_experts_per_tok} exceeds the experts in "
            f"topk_group={c.topk_group} groups of {per_group}"
        )


# --- presets ---------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # The model of reference/trl_baseline.md (1.73M params with its 16-token vocab).
    "glm4moe-toy": dict(
        vocab_size=512, hidden_size=128, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=4096,
        use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, routed_scaling_factor=1.0, norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
    # Fast unit tests: 1 dense + 2 MoE layers, 4 experts top-2.
    "glm4moe-tiny": dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=512,
        use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, routed_scaling_factor=1.0, norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
    # zai-org/GLM-4.6 config.json (reference/glm46.md).
    "glm-4.6": dict(
        vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        partial_rotary_factor=0.5, rope_theta=1000000.0, max_position_embeddings=202752,
        rms_norm_eps=1e-5, use_qk_norm=True, attention_bias=True, first_k_dense_replace=3,
        n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
        tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
        num_nextn_predict_layers=1,
    ),
}  # fmt: skip


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with config.json-key overrides (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"model preset {name!r}: unknown override key(s) {bad}")
    return ModelConfig(**(PRESETS[name] | overrides))


def count_params(config: ModelConfig, *, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active) parameter counts, from the model built on the meta device.

    total: every parameter of the model (embeddings and an untied lm_head included; the fp32
    router bias buffer excluded). active: the non-embedding parameters one token passes
    through: attention, norms, dense MLPs, the router, the shared experts and
    `num_experts_per_tok` routed experts per MoE layer (input embedding and lm_head excluded;
    that is how GLM-4.6's "32B active" is counted). include_mtp adds the MTP layer(s) of
    `num_nextn_predict_layers` to the total: one more MoE decoder layer each plus eh_proj
    [H, 2H] and three RMSNorms (enorm, hnorm, shared_head.norm); their embedding and head are
    shared with the main model. GLM-4.6 gives ~352.8B without and ~356.8B with its MTP layer.
    """
    import torch  # noqa: PLC0415  (config stays importable without building a model)

    from models.glm4moe import Glm4MoeForCausalLM  # noqa: PLC0415  (glm4moe imports config)

    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    embedding = model.model.embed_tokens.weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.lm_head.weight.numel()
    inactive = 0
    for block in model.moe_blocks():
        per_expert = sum(p.numel() for p in block.experts.parameters()) // config.n_routed_experts
        inactive += per_expert * (config.n_routed_experts - config.num_experts_per_tok)
    return total + (mtp if include_mtp else 0), total - embedding - inactive
