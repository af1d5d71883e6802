"""Export of a LoRA job: `adapter/` in PEFT's format and `hf/` with the adapters merged.

PEFT layout (peft 0.21, transformers 5's Glm4MoeForCausalLM; checked by
tests/models/test_lora_peft.py, which loads it with `PeftModel.from_pretrained`):
- attention projections: `target_modules` (full module paths), `lora_A.weight` [r, in],
  `lora_B.weight` [out, r];
- dense-MLP and shared-expert projections: `target_parameters` `<path>.weight` (a 2-D
  ParamWrapper: the same A/B keys and math). Not `target_modules`: PEFT's transformers-v4 ->
  v5 conversion for this model type rewrites any `*.gate_proj` / `up_proj` / `down_proj`
  target into the routed experts' fused parameter;
- routed experts: `target_parameters` `<bank>.gate_up_proj` (the inner ParamWrapper, keys
  under `<bank>.base_layer.`) and `<bank>.down_proj`; A [E*r, in] (expert-major: ours
  reshaped), B [out, r*E] (expert-minor: ours [E, out, r] permuted to [out, r, E]).
Dropout is written as 0: PEFT's ParamWrapper refuses any other value, and it is inert at
inference anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from models.checkpoint import save_pretrained
from models.glm4moe import Glm4MoeForCausalLM
from models.lora import ExpertAdapter, LoraAdapters
from trainer.lora_backend import merged_state

ADAPTER_DIR = "adapter"
_PREFIX = "base_model.model."


def peft_tensors(lora: LoraAdapters) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """(PEFT state dict, target_modules, target_parameters) of the adapters."""
    tensors: dict[str, Tensor] = {}
    modules: list[str] = []
    params: list[str] = []
    for path, adapter in zip(lora.paths, lora.adapters.values()):
        if isinstance(adapter, ExpertAdapter):
            params += [f"{path}.gate_up_proj", f"{path}.down_proj"]
            for proj, key in (("gate_up_proj", f"{path}.base_layer"), ("down_proj", path)):
                a, b = adapter.pair(proj)
                e, r, fan_in = a.shape
                tensors[f"{_PREFIX}{key}.lora_A.weight"] = a.reshape(e * r, fan_in)
                tensors[f"{_PREFIX}{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(-1, r * e)
            continue
        if ".self_attn." in path:
            modules.append(path)
        else:
            params.append(f"{path}.weight")
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = adapter.lora_A
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = adapter.lora_B
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    return tensors, modules, params


def save_peft_adapter(lora: LoraAdapters, path: str | Path, base_model: str = "") -> None:
    """Write adapter_config.json and adapter_model.safetensors into directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, modules, params = peft_tensors(lora)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.cfg.rank,
        "lora_alpha": lora.cfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "target_modules": modules,
        "target_parameters": params,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_lora_job(model: Glm4MoeForCausalLM, lora: LoraAdapters, hf_path: str | Path) -> None:
    """hf/ with `W + s B A` merged (serving and evaluation unchanged) and adapter/ beside it."""
    hf_path = Path(hf_path)
    full = Glm4MoeForCausalLM(model.config).to_dtype(model.dtype)
    full.load_hf_state_dict(merged_state(model, lora))
    save_pretrained(full, hf_path)
    save_peft_adapter(lora, hf_path.parent / ADAPTER_DIR, base_model=str(hf_path))
