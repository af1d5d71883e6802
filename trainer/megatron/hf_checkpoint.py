"""A lazy, read-only view of a Hugging Face checkpoint directory's tensors by on-disk name.

The megatron backend loads a checkpoint rank by rank: each rank reads only the tensors of its
own layers and experts (weights.load_hf_weights asks for them by name), so a GLM-4.6
checkpoint is never materialised whole in one process. Files are opened once, on first use.
Block-FP8 checkpoints are refused: the trainer starts from bf16/fp32 weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class LazyHFCheckpoint(Mapping[str, Tensor]):
    """Mapping HF tensor name -> tensor, read from `<path>/*.safetensors` on access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config = json.loads((self.path / "config.json").read_text())
        if config.get("quantization_config") is not None:
            raise ValueError(
                f"{self.path}/config.json: quantization_config is set; the megatron backend "
                "trains from a bf16/fp32 checkpoint"
            )
        index = self.path / INDEX_FILE
        if index.exists():
            self._files = dict(json.loads(index.read_text())["weight_map"])
        elif (self.path / SINGLE_FILE).exists():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), SINGLE_FILE)  # noqa: SIM118
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._open: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Tensor:
        file = self._files[name]
        if file not in self._open:
            self._open[file] = safe_open(self.path / file, framework="pt")
        return self._open[file].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
