"""Hugging Face checkpoint directories: config.json + safetensors with HF on-disk names.

`save_pretrained` writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards
plus `model.safetensors.index.json` when the weights exceed `max_shard_bytes`; an FP8 model
is written as a block-FP8 checkpoint (with `quantization_config`). `from_pretrained` reads
both layouts, and transformers' own `save_pretrained` output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from models.config import CONFIG_NAME, ModelConfig
from models.fp8 import fp8_quantization_config, model_fp8_block, quantize_model_
from models.glm4moe import Glm4MoeForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def save_pretrained(
    model: Glm4MoeForCausalLM, path: str | Path, max_shard_bytes: int = 2**31
) -> None:
    """Write config.json and the weights (sharded above max_shard_bytes) into `path`."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: expected >= 1, got {max_shard_bytes}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    block = model_fp8_block(model)
    extra = {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    if block is not None:
        extra["quantization_config"] = fp8_quantization_config(block)
    model.config.save(path, extra)
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, tensor in model.hf_state_dict():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    total = sum(t.numel() * t.element_size() for shard in shards for _, t in shard)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards, strict=True):
        # clone: expert slices share storage with the fused bank, which safetensors rejects
        tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in shard}
        save_file(tensors, path / file, metadata={"format": "pt"})
    for stale in _stale_weight_files(path, set(names)):
        stale.unlink()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: file for file, shard in zip(names, shards) for n, _ in shard},
        }
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    log.info("saved %s (%d shard(s), %.1f MB)", path, len(shards), total / 2**20)


def _stale_weight_files(path: Path, keep: set[str]) -> list[Path]:
    """Weight files of an earlier save into the same directory that this save did not write."""
    old = [p for p in path.glob("model*.safetensors") if p.name not in keep]
    if len(keep) == 1 and (path / INDEX_FILE).exists():
        old.append(path / INDEX_FILE)
    return old


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every tensor of a checkpoint directory, one file at a time."""
    for file in _weight_files(Path(path)):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _has_layer(path: Path, layer: int) -> bool:
    prefix = f"model.layers.{layer}."
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            if any(name.startswith(prefix) for name in f.keys()):  # noqa: SIM118
                return True
    return False


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    keep_fp8: bool = False,
) -> Glm4MoeForCausalLM:
    """Load an HF Glm4MoeForCausalLM checkpoint directory (ours or transformers').

    A block-FP8 checkpoint is dequantized into `dtype`, or kept FP8 with keep_fp8=True.
    The model is built on the meta device and materialised once, so no random init runs.
    A config that announces MTP layers whose tensors the checkpoint lacks (transformers'
    save_pretrained drops them) gives a model without MTP, with a warning.
    """
    path = Path(path)
    config = ModelConfig.load(path)
    if config.num_nextn_predict_layers and not _has_layer(path, config.num_hidden_layers):
        log.warning(
            "%s: config.json has num_nextn_predict_layers=%d but no model.layers.%d.* tensors; "
            "loading without the MTP layer", path, config.num_nextn_predict_layers,
            config.num_hidden_layers,
        )  # fmt: skip
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    raw = json.loads((path / CONFIG_NAME).read_text())
    quant = raw.get("quantization_config")
    block = None
    if quant is not None:
        if quant.get("quant_method") != "fp8" or "weight_block_size" not in quant:
            raise ValueError(
                f"{path / CONFIG_NAME}: quantization_config {quant} is not block FP8 "
                "(quant_method 'fp8' with weight_block_size)"
            )
        block = tuple(quant["weight_block_size"])
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config)
    model.to_dtype(dtype)
    if block is not None and keep_fp8:
        quantize_model_(model, block)
    model.to_empty(device=device)
    model.tie_weights()
    model.load_hf_state_dict(iter_checkpoint_tensors(path), strict=True, fp8_block=block)
    return model
