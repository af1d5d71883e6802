"""Weight updates and forward_cached with devices, as far as a CPU can check: the payload
device is the caller's choice (host bytes by default, identical when asked explicitly), and a
CPU model's forward_cached takes host index tensors as they are."""

from __future__ import annotations

import torch

from models import Glm4MoeForCausalLM, get_preset
from models.weight_update import (
    apply_weight_update,
    build_weight_update,
    decode_weight_update,
    encode_weight_update,
)


def _tiny(seed: int) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(get_preset("glm4moe-tiny"))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def test_weight_update_payload_device_and_round_trip() -> None:
    src, dst = _tiny(0), _tiny(1)
    update = build_weight_update(src.hf_state_dict(), 3, dtype=torch.float32, bucket_bytes=2**14)
    explicit = build_weight_update(
        src.hf_state_dict(), 3, dtype=torch.float32, bucket_bytes=2**14, device="cpu"
    )
    assert len(update.buckets) > 1
    assert all(b.payload.device.type == "cpu" for b in update.buckets)
    assert [b.payload.tolist() for b in update.buckets] == [
        b.payload.tolist() for b in explicit.buckets
    ]
    apply_weight_update(dst, decode_weight_update(bytearray(encode_weight_update(update))))
    for (name, a), (_, b) in zip(src.hf_state_dict(), dst.hf_state_dict(), strict=True):
        assert torch.equal(a, b), name


def test_forward_cached_on_cpu_takes_host_tensors_as_they_are() -> None:
    model = _tiny(0).eval()
    cache = model.new_kv_cache(2, 16)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    logits = model.forward_cached(
        ids, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), torch.tensor([3, 2]), cache
    )
    assert logits.shape == (2, model.config.vocab_size)
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()
