"""HF checkpoint I/O in both directions with transformers, sharding, dtypes and FP8."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import Fp8Linear, from_pretrained, quantize_model_, save_pretrained
from models.fp8 import Fp8ExpertBank
from tests.models.glm_helpers import full_logits, make_model, to_hf

torch.set_num_threads(1)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


def test_transformers_checkpoint_loads_into_ours(tmp_path) -> None:
    model = make_model(seed=20, tie_word_embeddings=False, attention_bias=True)
    hf = to_hf(model)
    hf.save_pretrained(tmp_path)
    # transformers wrote per-expert on-disk names, not its fused in-memory ones
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (11,))
    assert torch.equal(full_logits(ours, ids), full_logits(model, ids))
    assert (full_logits(ours, ids) - _hf_logits(hf, ids)).abs().max().item() < 1e-5


def test_our_checkpoint_loads_in_transformers(tmp_path) -> None:
    model = make_model(seed=21)
    save_pretrained(model, tmp_path)
    names = {n for n, _ in model.hf_state_dict()}
    assert names == set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in names  # tied
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in names
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (9,))
    assert (_hf_logits(hf, ids) - full_logits(model, ids)).abs().max().item() < 1e-5
    assert torch.equal(
        hf.model.layers[2].mlp.gate.e_score_correction_bias,
        model.model.layers[2].mlp.gate.e_score_correction_bias,
    )


def test_sharded_save_and_load_in_both_libraries(tmp_path) -> None:
    model = make_model(seed=22, tie_word_embeddings=False)
    save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == {n for n, _ in model.hf_state_dict()}
    total = sum(t.numel() * t.element_size() for _, t in model.hf_state_dict())
    assert index["metadata"]["total_size"] == total
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (7,))
    assert torch.equal(full_logits(ours, ids), full_logits(model, ids))
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path).eval()
    assert (_hf_logits(hf, ids) - full_logits(model, ids)).abs().max().item() < 1e-5
    # re-saving unsharded into the same directory leaves no stale shards behind
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_dtype_mtp_layers_and_unknown_names(tmp_path) -> None:
    model = make_model(seed=23)
    save_pretrained(model, tmp_path)
    bf16 = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert bf16.moe_blocks()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["model_type"] == "glm4_moe"
    # an MTP layer (index == num_hidden_layers), as in GLM-4.5/4.6 checkpoints, is skipped
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 128, (5,))
    assert torch.equal(full_logits(from_pretrained(tmp_path), ids), full_logits(model, ids))
    tensors["model.layers.0.mlp.gate_prj.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gate_prj.*did you mean"):
        from_pretrained(tmp_path)
    del tensors["model.layers.0.mlp.gate_prj.weight"], tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 1 tensor.*model.norm.weight"):
        from_pretrained(tmp_path)


def test_fp8_checkpoint_round_trip(tmp_path) -> None:
    model = make_model(seed=24, tie_word_embeddings=False)
    quantize_model_(model, block=(32, 32))
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [32, 32],
    }
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (2, 2)
    assert tensors["model.layers.1.mlp.experts.2.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"].shape == (2, 1)
    for plain in ("lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        assert tensors[plain].dtype == torch.float32
    ids = torch.randint(0, 128, (8,))
    ref = full_logits(model, ids)
    kept = from_pretrained(tmp_path, keep_fp8=True)
    assert isinstance(kept.model.layers[0].self_attn.o_proj, Fp8Linear)
    assert isinstance(kept.moe_blocks()[0].experts, Fp8ExpertBank)
    assert torch.equal(full_logits(kept, ids), ref)
    plain = from_pretrained(tmp_path)  # dequantized into fp32
    assert isinstance(plain.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert (full_logits(plain, ids) - ref).abs().max().item() < 1e-5
