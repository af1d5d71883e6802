"""gpu_check's table: one row per measurement, Physarum against transformers, and the
header that says what ran where."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One line of the table. ours/hf: the figure (None = not measured: see `note`)."""

    name: str
    unit: str
    ours: float | None
    hf: float | None = None
    detail: str = ""
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.hf is None or self.hf == 0:
            return None
        return self.ours / self.hf if self.unit.endswith("/s") else self.hf / self.ours


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "s" or unit == "s/step":
        return f"{x:.4f}" if x < 1 else f"{x:.2f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(rows: list[Row]) -> str:
    """The rows as one Markdown table (ratio: ours/HF for rates, HF/ours for times)."""
    lines = [
        "| measurement | unit | Physarum | HF transformers | Physarum vs HF | detail |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        hf = _fmt(r.hf, r.unit) if r.hf is not None else ("n/a" if r.note else "-")
        detail = r.detail + (f" (HF: {r.note})" if r.note else "")
        lines.append(
            f"| {r.name} | {r.unit} | {_fmt(r.ours, r.unit)} | {hf} | {ratio} | {detail} |"
        )
    return "\n".join(lines)


def describe(
    device_setting: str, size_name: str, model: dict[str, Any], versions: dict[str, str]
) -> str:
    """The run's header: the device, the versions, the model (`model`: overrides of the
    glm4moe-toy preset)."""
    import torch

    from models import count_params, get_preset

    total, active = count_params(get_preset("glm4moe-toy", **model))
    if device_setting == "cuda":
        card = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        where = f"{card} ({mem:.0f} GiB)"
    else:
        where = f"CPU ({torch.get_num_threads()} torch threads)"
    vs = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        f"device: {where}\n{vs}\n"
        f"model: GLM-4 MoE '{size_name}', {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M "
        "active), random init, same weights on both sides"
    )
