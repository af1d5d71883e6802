"""LoRA adapters: our hooked forward against PEFT on transformers' Glm4MoeForCausalLM.

The exported adapter/ (PEFT format) is loaded with `peft.PeftModel.from_pretrained` onto the
same starting model in transformers; logits agree within 1e-5 in fp32. Every target kind is
in: attention, the dense MLP (layer 0), the shared expert and the routed experts.
"""

from __future__ import annotations

import pytest
import torch

from configs.services import LORA_TARGETS, LoraConfig
from models import Glm4MoeForCausalLM
from models.lora import attach_lora
from tests.models.glm_helpers import full_logits, make_model, to_hf
from trainer.lora_backend import merged_state
from trainer.lora_export import save_peft_adapter

torch.set_num_threads(1)


def _adapted(targets: list[str], seed: int = 3):
    model = make_model(seed=1)
    lora = attach_lora(model, LoraConfig(rank=4, alpha=6.0, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: make every adapter matter
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, lora


def test_zero_b_adapters_leave_the_base_untouched() -> None:
    model = make_model(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (11,))
    before = full_logits(model, ids)
    lora = attach_lora(model, LoraConfig(rank=4, target_modules=list(LORA_TARGETS)))
    assert torch.equal(full_logits(model, ids), before)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in lora.parameters())


def test_peft_round_trip_matches_our_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model, lora = _adapted(list(LORA_TARGETS))
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    ours = [full_logits(model, ids[row]) for row in range(2)]
    with lora.disabled():
        base = full_logits(model, ids[0])
    assert (ours[0] - base).abs().max() > 1e-3  # the adapters change the model

    save_peft_adapter(lora, tmp_path / "adapter")
    with lora.disabled():
        hf = to_hf(model)  # the starting model, in transformers' class
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits.float()
    for row in range(2):
        assert (ours[row] - theirs[row]).abs().max().item() < 1e-5

    # the merged full model (what hf/ holds) gives the same logits without any adapter
    merged = Glm4MoeForCausalLM(model.config)
    merged.load_hf_state_dict(merged_state(model, lora))
    assert (full_logits(merged, ids[1]) - ours[1]).abs().max().item() < 1e-5


def test_routed_expert_adapters_run_inside_the_grouped_gemm() -> None:
    """Per-expert adapters equal a per-expert reference computed one expert at a time."""
    model, lora = _adapted(["experts"])
    bank = model.moe_blocks()[0].experts
    adapter = lora.adapters["model__layers__1__mlp__experts"]
    counts = torch.tensor([3, 0, 5, 2])
    xs = torch.randn(int(counts.sum()), model.config.hidden_size)
    got = bank(xs, counts)
    rows, start, s = [], 0, lora.scaling
    for e, n in enumerate(counts.tolist()):
        x = xs[start : start + n]
        gu_w = bank.gate_up_proj[e] + s * adapter.gate_up_proj_B[e] @ adapter.gate_up_proj_A[e]
        down_w = bank.down_proj[e] + s * adapter.down_proj_B[e] @ adapter.down_proj_A[e]
        gate, up = (x @ gu_w.T).chunk(2, dim=-1)
        rows.append((torch.nn.functional.silu(gate) * up) @ down_w.T)
        start += n
    assert torch.allclose(got, torch.cat(rows), atol=1e-5)
