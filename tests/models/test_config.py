"""ModelConfig <-> HF config.json, presets and parameter counts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from models import PRESETS, ModelConfig, count_params, get_preset
from models.config import _BOOKKEEPING_KEYS

torch.set_num_threads(1)


def test_glm46_counts_355b_total_32b_active() -> None:
    config = get_preset("glm-4.6")
    total, active = count_params(config)
    # main model (92 layers) ~352.8B; with the MTP layer ~356.8B; GLM-4.6 is "355B / 32B"
    assert abs(total - 355e9) / 355e9 < 0.015, total
    assert abs(active - 32e9) / 32e9 < 0.015, active
    with_mtp, active_mtp = count_params(config, include_mtp=True)
    assert active_mtp == active
    assert 3.9e9 < with_mtp - total < 4.1e9  # one MoE decoder layer + eh_proj + norms
    assert abs(with_mtp - 355e9) / 355e9 < 0.015


def test_toy_matches_the_trl_baseline_model() -> None:
    # reference/trl_baseline.md: the same architecture with a 16-token vocab has 1.73M params
    total, active = count_params(get_preset("glm4moe-toy", vocab_size=16))
    assert round(total / 1e6, 2) == 1.73
    # 6 of 8 routed experts idle per MoE layer, 3 MoE layers; embedding (tied) not active
    per_expert = 3 * 128 * 128
    assert active == total - 16 * 128 - 3 * 6 * per_expert
    toy = get_preset("glm4moe-toy")
    assert toy.vocab_size == 512 and toy.moe_layer_ids == [1, 2, 3]
    assert 1e6 < count_params(toy)[0] < 10e6


def test_presets_and_overrides() -> None:
    assert set(PRESETS) == {"glm4moe-toy", "glm4moe-tiny", "glm-4.6"}
    with pytest.raises(ValueError, match="glm4moe-toy"):
        get_preset("glm-5")
    with pytest.raises(ValueError, match="hiden_size"):
        get_preset("glm4moe-toy", hiden_size=3)
    assert get_preset("glm4moe-toy", vocab_size=16).vocab_size == 16
    glm = get_preset("glm-4.6")
    assert (glm.num_hidden_layers, glm.hidden_size, glm.n_routed_experts) == (92, 5120, 160)
    assert glm.moe_layer_ids[0] == 3 and len(glm.moe_layer_ids) == 89


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_loads_in_transformers_and_round_trips(name: str) -> None:
    config = get_preset(name)
    d = config.to_hf_dict()
    hf = transformers.Glm4MoeConfig.from_dict(d)
    for field in dataclasses.fields(ModelConfig):
        if field.name in ("rope_theta", "partial_rotary_factor"):
            assert hf.rope_parameters[field.name] == getattr(config, field.name)
        elif field.name == "num_nextn_predict_layers":
            assert hf.num_mtp_layers == config.num_nextn_predict_layers
        else:
            assert getattr(hf, field.name) == getattr(config, field.name), field.name
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == config
    # and what transformers itself writes reads back
    assert ModelConfig.from_hf_dict(hf.to_dict()) == config


def test_glm46_hub_style_config_json(tmp_path) -> None:
    # the shape of zai-org/GLM-4.6 config.json: top-level rope keys, null rope_scaling, dtype
    hub = {k: v for k, v in get_preset("glm-4.6").to_hf_dict().items() if k != "rope_parameters"}
    hub |= {"torch_dtype": "bfloat16", "transformers_version": "4.54.0", "rope_theta": 1000000}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert ModelConfig.load(tmp_path) == get_preset("glm-4.6")
    ModelConfig.load(tmp_path).save(tmp_path / "out")
    assert ModelConfig.load(tmp_path / "out") == get_preset("glm-4.6")


def test_bad_configs_name_the_field() -> None:
    d = get_preset("glm4moe-tiny").to_hf_dict()
    with pytest.raises(ValueError, match="num_experts_per_tokn.*num_experts_per_tok"):
        ModelConfig.from_hf_dict(d | {"num_experts_per_tokn": 2})
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict(d | {"model_type": "llama"})
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_hf_dict(d | {"rope_scaling": {"rope_type": "yarn", "factor": 4}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        get_preset("glm4moe-tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="n_group"):
        get_preset("glm4moe-tiny", n_group=3)
    with pytest.raises(ValueError, match="hidden_size"):
        get_preset("glm4moe-tiny", hidden_size=0)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_preset("glm4moe-tiny", n_group=2, topk_group=1, num_experts_per_tok=3)
    assert "architectures" in _BOOKKEEPING_KEYS
