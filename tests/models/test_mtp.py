"""GLM's MTP layer: HF names, bit-exact checkpoint round trips, and transformers parity."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.modeling_layers import MtpModel

from models import from_pretrained, save_pretrained
from models.mtp import mtp_targets
from tests.models.glm_helpers import make_model, to_hf

torch.set_num_threads(1)

MTP = dict(num_nextn_predict_layers=1)


def _mtp_model(seed: int, **overrides):
    """A tiny model with one MTP layer whose norms, router and bias are non-trivial."""
    model = make_model(seed=seed, **(MTP | overrides))
    with torch.no_grad():
        for name, p in model.mtp.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 0.3)
        model.mtp[0].decoder.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def test_mtp_tensors_have_glm_names() -> None:
    model = _mtp_model(0)
    names = {n for n, _ in model.hf_state_dict()}
    n = model.config.num_hidden_layers
    for own in ("eh_proj", "enorm", "hnorm", "shared_head.norm"):
        assert f"model.layers.{n}.{own}.weight" in names
    # its decoder layer is an MoE layer named like a main one
    assert f"model.layers.{n}.self_attn.q_proj.weight" in names
    assert f"model.layers.{n}.mlp.experts.3.down_proj.weight" in names
    assert f"model.layers.{n}.mlp.gate.e_score_correction_bias" in names
    assert f"model.layers.{n}.post_attention_layernorm.weight" in names
    assert not any(x.startswith("mtp.") or ".decoder." in x for x in names)
    shape = dict(model.hf_state_dict())[f"model.layers.{n}.eh_proj.weight"].shape
    assert tuple(shape) == (64, 128)
    # the main paths do not see it: same expert_load rows, same KV-cache layers
    assert len(model.moe_blocks()) == 2 and model.new_kv_cache(1, 8).layers.__len__() == 3


@pytest.mark.parametrize("shard", [2**31, 40_000])
def test_round_trip_keeps_every_tensor_bit_for_bit(tmp_path, shard) -> None:
    model = _mtp_model(1, tie_word_embeddings=False).to_dtype(torch.bfloat16)
    save_pretrained(model, tmp_path / "a", max_shard_bytes=shard)
    loaded = from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    save_pretrained(loaded, tmp_path / "b", max_shard_bytes=shard)
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert set(a) == set(b) and any(".3.eh_proj" in k for k in a)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_glm45_style_copies_of_embedding_and_head_are_kept(tmp_path) -> None:
    """GLM-4.5 checkpoints also store the embedding and lm_head inside the MTP layer."""
    model = _mtp_model(2, tie_word_embeddings=False)
    save_pretrained(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    embed_copy = torch.randn(128, 64)  # deliberately not the main embedding
    tensors["model.layers.3.embed_tokens.weight"] = embed_copy
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path / "a")
    save_pretrained(loaded, tmp_path / "b")
    again = load_file(tmp_path / "b" / "model.safetensors")
    assert set(again) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(again[name], t), name
    # the copy is carried, not used: outputs equal the model's without it
    ids = torch.randint(0, 128, (7,))
    cu = torch.tensor([0, 7])
    with torch.no_grad():
        h0, h1 = (m.forward_packed(ids, cu).hidden for m in (model, loaded))
        assert torch.equal(model.forward_mtp(ids, cu, h0)[0], loaded.forward_mtp(ids, cu, h1)[0])


def test_checkpoint_announcing_mtp_without_its_tensors_loads_without_it(tmp_path, caplog) -> None:
    """transformers' save_pretrained keeps num_mtp_layers in config.json but drops the layer."""
    model = make_model(seed=3)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    with caplog.at_level(logging.WARNING):
        loaded = from_pretrained(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    assert "num_nextn_predict_layers=1" in caplog.text


def test_unknown_mtp_tensor_name_is_rejected() -> None:
    model = _mtp_model(4)
    with pytest.raises(ValueError, match="model.layers.3.eh_proj.weight"):
        model.load_hf_state_dict([("model.layers.3.eh_prj.weight", torch.zeros(64, 128))], False)
    # a layer past the MTP layers is skipped, as before
    beyond = [("model.layers.4.eh_proj.weight", torch.zeros(1))]
    assert model.load_hf_state_dict(beyond, False) == []


def _to_hf_mtp(model, hf) -> MtpModel:
    """transformers' MtpModel (speculative decoding's MTP) with our MTP weights."""
    mtp = MtpModel(hf, num_mtp_layers=1).eval()
    ours = {}
    for name, t in model.mtp[0].state_dict().items():
        name = name.replace("decoder.", "mtp_block.").replace("shared_head.norm", "post_norm")
        ours[f"layers.0.{name}"] = t
    missing, unexpected = mtp.load_state_dict(ours, strict=False)
    shared = ("embed_tokens.weight", "shared_head.weight")
    assert not unexpected and all(m in shared for m in missing), (missing, unexpected)
    return mtp


@pytest.mark.parametrize("tied", [True, False])
def test_mtp_logits_match_transformers(tied: bool) -> None:
    """Row t of our MTP (hidden h_t, token x_{t+1}) equals transformers' MtpLayer on the same
    inputs; its logits predict x_{t+2}."""
    model = _mtp_model(5, tie_word_embeddings=tied, attention_bias=True)
    hf = to_hf(model)
    mtp = _to_hf_mtp(model, hf)
    assert isinstance(mtp.layers[0].mtp_block.mlp, type(hf.model.layers[1].mlp))  # MoE
    lengths = (11, 6)
    seqs = [torch.randint(0, 128, (n,)) for n in lengths]
    ids, cu = torch.cat(seqs), torch.tensor([0, 11, 17])
    with torch.no_grad():
        hidden = model.forward_packed(ids, cu).hidden
        ours = model.lm_head(model.forward_mtp(ids, cu, hidden)[0])
        for seq, start in zip(seqs, (0, 11), strict=True):
            n = seq.numel()
            main = hf(seq[None], output_hidden_states=True)
            h = main.hidden_states[-1][:, : n - 1]  # transformers' last entry is after model.norm
            assert (h[0] - hidden[start : start + n - 1]).abs().max() < 1e-5
            out = mtp.forward_layer(0, h, torch.arange(1, n)[None], None, input_ids=seq[None, 1:])
            ref = mtp._project_to_logits(out)[0]
            assert (ours[start : start + n - 1] - ref).abs().max().item() < 1e-5
    # routing differs between tokens in the MTP layer (the comparison would be weak otherwise)
    assert ours.std(0).mean() > 0.01


def test_mtp_targets_are_two_tokens_ahead_within_a_sequence() -> None:
    model = _mtp_model(6)
    ids = torch.tensor([10, 11, 12, 13, 20, 21, 22])
    targets, valid = mtp_targets(ids, torch.tensor([0, 4, 7]), depth=0)
    assert valid.tolist() == [True, True, False, False, True, False, False]
    assert targets[valid].tolist() == [12, 13, 22]
    assert transformers.Glm4MoeConfig.from_dict(model.config.to_hf_dict()).num_mtp_layers == 1


def _read(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out
