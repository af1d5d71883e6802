"""LoRA adapters on a frozen Glm4MoeForCausalLM: attention, dense MLP, shared and routed experts.

The adapters live in their own module (`LoraAdapters`), never inside the model's module tree,
so the model's state dict, `hf_state_dict` and checkpoints stay base-only. They act through
hooks: a forward hook on each targeted nn.Linear adds `s * B(A(dropout(x)))`, and a routed
ExpertBank gets an `ExpertDelta` that `models.moe.expert_swiglu` applies inside the grouped
expert GEMMs (one adapter pair per expert, stacked A [E, r, in], B [E, out, r], computed by
the same grouped GEMM over the same expert-sorted rows: no loop over experts per token).
This layout is PEFT's `target_parameters` one for 3-D expert weights, so export is a reshape.

`LoraAdapters.disabled()` turns every adapter off (the base model: the KL reference for free).

Sync tensor names (models.weight_update messages): `<module>.lora_A.weight` [r, in] and
`<module>.lora_B.weight` [out, r] for a linear (module = its HF path), `<bank>.<proj>.lora_A`
[E, r, in] / `.lora_B` [E, out, r] for a routed ExpertBank's `gate_up_proj` / `down_proj`,
plus `lora.scaling` (fp32 [1]). `adapter_deltas` turns them into HF weight deltas.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from configs.services import LoraConfig
from models.moe import MoE

SCALING_NAME = "lora.scaling"
_DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_BANK_PROJS = ("gate_up_proj", "down_proj")


def _init_a(a: Tensor, init: str, rank: int, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        if init == "gaussian":  # PEFT's "gaussian": N(0, 1/r)
            a.normal_(0.0, 1.0 / rank, generator=generator)
        else:  # PEFT's default: kaiming-uniform with a = sqrt(5) over fan_in
            bound = 1.0 / math.sqrt(a.shape[-1])
            a.uniform_(-bound, bound, generator=generator)


class LinearAdapter(nn.Module):
    """lora_A [r, in], lora_B [out, r] (B starts at zero: the adapted model starts as the base)."""

    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.p = dropout

    def delta(self, x: Tensor) -> Tensor:
        """x [..., in] -> B A dropout(x) [..., out] (unscaled). Dropout only in passes that
        build a graph: the no-grad logprob passes see the deterministic adapter."""
        if self.p > 0 and torch.is_grad_enabled():
            x = F.dropout(x, self.p, training=True)
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


class ExpertAdapter(nn.Module):
    """One pair per routed expert: gate_up A [E, r, H], B [E, 2I, r]; down A [E, r, I],
    B [E, H, r]."""

    def __init__(self, experts: int, hidden: int, inter: int, rank: int) -> None:
        super().__init__()
        self.gate_up_proj_A = nn.Parameter(torch.empty(experts, rank, hidden))
        self.gate_up_proj_B = nn.Parameter(torch.zeros(experts, 2 * inter, rank))
        self.down_proj_A = nn.Parameter(torch.empty(experts, rank, inter))
        self.down_proj_B = nn.Parameter(torch.zeros(experts, hidden, rank))

    def pair(self, proj: str) -> tuple[Tensor, Tensor]:
        return getattr(self, proj + "_A"), getattr(self, proj + "_B")


class ExpertDelta:
    """What `models.moe.expert_swiglu` calls: the routed adapters over expert-sorted rows.

    A plain object (not an nn.Module), so setting it on an ExpertBank adds no parameters there.
    """

    def __init__(self, owner: LoraAdapters, adapter: ExpertAdapter) -> None:
        self.owner, self.adapter = owner, adapter

    def __call__(self, proj: str, rows: Tensor, offs: Tensor, grouped: Callable) -> Tensor | None:
        """rows [M, in] sorted by expert (offs: int32 cumulative counts) -> s B_e A_e x [M, out],
        or None when adapters are disabled."""
        if not self.owner.enabled:
            return None
        a, b = self.adapter.pair(proj)
        low = grouped(rows, a.to(rows.dtype).transpose(1, 2), offs=offs)  # [M, r]
        return grouped(low, b.to(rows.dtype).transpose(1, 2), offs=offs) * self.owner.scaling


class LoraAdapters(nn.Module):
    """All adapters of one model (see the module docstring). `adapters` is keyed by the
    targeted module's path with dots as '__' (ModuleDict keys cannot hold dots)."""

    def __init__(self, cfg: LoraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scaling = cfg.alpha / cfg.rank
        self.enabled = True
        self.adapters = nn.ModuleDict()
        self._handles: list[Any] = []
        self._banks: list[Any] = []

    @property
    def paths(self) -> list[str]:
        return [key.replace("__", ".") for key in self.adapters]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model inside: every adapter contributes nothing."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def detach_hooks(self) -> None:
        """Remove the hooks from the model (the adapters stay, unused)."""
        for handle in self._handles:
            handle.remove()
        for bank in self._banks:
            bank.lora = None
        self._handles, self._banks = [], []

    # --- sync and export -----------------------------------------------------------------------
    def sync_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) of every adapter plus the scaling (names: module docstring)."""
        for path, module in zip(self.paths, self.adapters.values()):
            if isinstance(module, ExpertAdapter):
                for proj in _BANK_PROJS:
                    a, b = module.pair(proj)
                    yield f"{path}.{proj}.lora_A", a.detach()
                    yield f"{path}.{proj}.lora_B", b.detach()
            else:
                yield f"{path}.lora_A.weight", module.lora_A.detach()
                yield f"{path}.lora_B.weight", module.lora_B.detach()
        yield SCALING_NAME, torch.tensor([self.scaling], dtype=torch.float32)

    def deltas(self) -> dict[str, Tensor]:
        """HF on-disk weight name -> s * B A (float32), for merging into a full model."""
        return adapter_deltas(self.sync_tensors())


def _targets(model: nn.Module, cfg: LoraConfig) -> Iterator[tuple[str, nn.Module]]:
    """(module path, module) of every target in the main layers (MTP layers get none)."""
    wanted = set(cfg.target_modules)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        for name in _ATTENTION:
            if name in wanted:
                yield f"{prefix}.self_attn.{name}", getattr(layer.self_attn, name)
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            for name in _DENSE_MLP:
                if name in wanted:
                    yield f"{prefix}.mlp.{name}", getattr(mlp, name)
            continue
        if "shared_experts" in wanted and mlp.shared_experts is not None:
            for name in _DENSE_MLP:
                yield f"{prefix}.mlp.shared_experts.{name}", getattr(mlp.shared_experts, name)
        if "experts" in wanted:
            yield f"{prefix}.mlp.experts", mlp.experts


def target_weight_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """HF on-disk names of the weights cfg's adapters change (experts: per expert)."""
    names = []
    for path, module in _targets(model, cfg):
        if isinstance(module, nn.Linear):
            names.append(f"{path}.weight")
            continue
        for j in range(module.num_experts):
            names += [f"{path}.{j}.{proj}.weight" for proj in _DENSE_MLP]
    return names


def attach_lora(
    model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None
) -> LoraAdapters:
    """Freeze `model` (requires_grad False everywhere) and hook fresh adapters into it."""
    model.requires_grad_(False)
    lora = LoraAdapters(cfg)
    dtype, device = model.dtype, model.device
    for path, module in _targets(model, cfg):
        if isinstance(module, nn.Linear):
            adapter = LinearAdapter(module.in_features, module.out_features, cfg.rank, cfg.dropout)
        else:
            e, two_i, h = module.gate_up_proj.shape
            adapter = ExpertAdapter(e, h, two_i // 2, cfg.rank)
        adapter.to(device=device, dtype=dtype)
        for name, p in adapter.named_parameters():
            if name.endswith("A"):
                _init_a(p, cfg.init, cfg.rank, generator)
        lora.adapters[path.replace(".", "__")] = adapter
        if isinstance(adapter, LinearAdapter):
            lora._handles.append(module.register_forward_hook(_linear_hook(lora, adapter)))
        else:
            module.lora = ExpertDelta(lora, adapter)
            lora._banks.append(module)
    if not lora.adapters:
        raise ValueError(
            f"trainer.lora.target_modules: {cfg.target_modules} match no module of this model"
        )
    return lora


def _linear_hook(owner: LoraAdapters, adapter: LinearAdapter) -> Callable:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        if not owner.enabled:
            return None
        return out + adapter.delta(inputs[0]) * owner.scaling

    return hook


def adapter_deltas(named: Iterator[tuple[str, Tensor]] | list) -> dict[str, Tensor]:
    """Sync tensors (names: module docstring) -> {HF on-disk weight name: s * B A, float32}.
    Routed experts expand into their per-expert `experts.{j}.{gate,up,down}_proj.weight`."""
    tensors = {name: t for name, t in named}
    if SCALING_NAME not in tensors:
        raise ValueError(f"LoRA update: no {SCALING_NAME!r} tensor")
    scaling = float(tensors.pop(SCALING_NAME).float().reshape(-1)[0])
    deltas: dict[str, Tensor] = {}
    for name, a in tensors.items():
        if ".lora_A" not in name:
            continue
        b = tensors[name.replace(".lora_A", ".lora_B")].float()
        a = a.float()
        if name.endswith(".lora_A.weight"):  # a linear: [out, r] @ [r, in]
            deltas[name.removesuffix(".lora_A.weight") + ".weight"] = scaling * (b @ a)
            continue
        bank, proj = name.removesuffix(".lora_A").rsplit(".", 1)
        fused = scaling * torch.bmm(b, a)  # [E, out, in]
        for j in range(fused.shape[0]):
            if proj == "down_proj":
                deltas[f"{bank}.{j}.down_proj.weight"] = fused[j]
            else:
                gate, up = fused[j].chunk(2, dim=0)
                deltas[f"{bank}.{j}.gate_proj.weight"] = gate
                deltas[f"{bank}.{j}.up_proj.weight"] = up
    return deltas


def is_adapter_name(name: str) -> bool:
    return name == SCALING_NAME or ".lora_A" in name or ".lora_B" in name
