"""SGLang's wire layout of routed experts <-> ours (R3).

SGLang 0.5.23 (`return_routed_experts`, `routed_experts_start_len`) answers with
`meta_info["routed_experts"]`: base64 of int32 [N, num_hidden_layers, k] covering positions
[start_len, seqlen - 1) of prompt + output (srt/state_capturer/routed_experts.py, the
scheduler's batch_result_processor). Dense layers hold no choice. Ours (Episode,
GenerateOutput) is uint8/uint16 [N, n_moe, k] over the MoE layers only, ascending per token:
`decode` maps SGLang's to ours; `encode` is what the embedded engine's HTTP server answers,
in SGLang's layout, so one client serves both.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from buffer.episode import routing_dtype


@dataclass(frozen=True)
class RoutingLayout:
    """The MoE geometry a routed-experts payload is read with."""

    num_layers: int  # num_hidden_layers (MTP layers excluded, as SGLang's capturer)
    moe_layers: tuple[int, ...]  # indices of the MoE layers among them
    top_k: int
    num_experts: int

    @classmethod
    def of(cls, config: Any) -> RoutingLayout:
        """From a models.ModelConfig or an HF config.json dict of a GLM-4-MoE model."""
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
        layers = int(get("num_hidden_layers"))
        dense = int(get("first_k_dense_replace") or 0)
        return cls(
            num_layers=layers,
            moe_layers=tuple(range(dense, layers)),
            top_k=int(get("num_experts_per_tok")),
            num_experts=int(get("n_routed_experts")),
        )

    def encode(self, routed: np.ndarray) -> str:
        """Ours [N, n_moe, k] -> SGLang's base64 int32 [N, num_layers, k] (dense rows 0)."""
        rows = np.zeros((len(routed), self.num_layers, self.top_k), np.int32)
        if len(routed):
            rows[:, list(self.moe_layers)] = routed
        return base64.b64encode(rows.tobytes()).decode("ascii")

    def decode(self, payload: str) -> np.ndarray:
        """SGLang's base64 int32 [N, num_layers, k] -> ours [N, n_moe, k], ascending per token;
        ValueError naming what does not fit this layout."""
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, TypeError) as e:
            raise ValueError(f"meta_info.routed_experts: not base64 ({e})") from None
        per_token = self.num_layers * self.top_k * 4
        if len(raw) % per_token:
            raise ValueError(
                f"meta_info.routed_experts: {len(raw)} bytes is not a multiple of "
                f"{self.num_layers} layers x top-{self.top_k} x int32"
            )
        rows = np.frombuffer(raw, np.int32).reshape(-1, self.num_layers, self.top_k)
        moe = rows[:, list(self.moe_layers)]
        if moe.size and (moe.min() < 0 or moe.max() >= self.num_experts):
            raise ValueError(
                f"meta_info.routed_experts: expert ids outside 0..{self.num_experts - 1}"
            )
        return np.sort(moe, axis=-1).astype(routing_dtype(self.num_experts))
