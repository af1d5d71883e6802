"""Shared helpers of the models tests: tiny GLM-4 MoE models with non-trivial weights and the
same weights in transformers' Glm4MoeForCausalLM (the reference)."""

from __future__ import annotations

import torch
import transformers

from models import Glm4MoeForCausalLM, get_preset


def make_model(seed: int = 0, **overrides) -> Glm4MoeForCausalLM:
    """glm4moe-tiny with overrides; norms, biases and the router bias made non-trivial."""
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(get_preset("glm4moe-tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        for block in model.moe_blocks():
            block.gate.e_score_correction_bias.normal_(0.0, 0.05)
            # spread the router scores so that routing depends on the token
            block.gate.weight.normal_(0.0, 0.3)
    return model


def to_hf(model: Glm4MoeForCausalLM, attn: str = "eager") -> torch.nn.Module:
    """transformers' Glm4MoeForCausalLM with the same weights (in-memory names coincide)."""
    config = transformers.Glm4MoeConfig.from_dict(model.config.to_hf_dict())
    config._attn_implementation = attn
    hf = transformers.Glm4MoeForCausalLM(config).eval()
    # transformers' main model has no MTP layer (its MtpModel is built apart: tests/models/test_mtp)
    main = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = hf.load_state_dict(main, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.to(model.dtype)


def full_logits(model: Glm4MoeForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Our training-path logits [T, V] of one sequence."""
    with torch.no_grad():
        out = model.forward_packed(ids, torch.tensor([0, ids.numel()]))
        return model.lm_head(out.hidden).float()
