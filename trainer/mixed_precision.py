"""bf16 mixed precision's weight cache: one bf16 copy of the matmul weights per optimizer step.

Under trainer.dtype bfloat16 the master weights stay fp32 (AdamW updates them). Plain CPU
autocast casts each weight to bf16 inside every autocast region, into a fresh buffer (page
faults for ~2 bytes a parameter), and `models.moe` casts the routed experts by hand each
forward. `Bf16Weights` keeps one persistent bf16 buffer per matmul weight instead: a weight
is re-cast after every step of the optimizer given (a step post-hook: the fused AdamW
updates in place without bumping the version counter) and whenever its master changed
otherwise (version counter or storage moved: a checkpoint load), so one cast per step serves
every forward of that step (the logprob passes, each micro-batch, the backward). Inside
`autocast()` the modules see the bf16 copies; a copy's gradient reaches its fp32 master as
an fp32 gradient, as autocast's own cast does.

Cached: every nn.Linear weight (attention, dense and shared-expert MLPs, MTP's eh_proj) and
the routed experts' fused weights. Not cached: the router (it computes in fp32), norms,
embeddings, biases, and lm_head: its chunked logprob pass (models/logprobs.py) casts it once
per call and sums its gradient over chunks in fp32, which a bf16 copy would round to bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from models.moe import ExpertBank

_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def compute_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """trainer.dtype's autocast dtype (None: plain fp32); a CUDA device always computes in bf16."""
    return torch.bfloat16 if device.type == "cuda" else _COMPUTE_DTYPES[setting]


def autocast(
    dtype: torch.dtype | None, device_type: str, weights: Bf16Weights | None
) -> contextlib.AbstractContextManager:
    """The region a forward runs in: nothing (fp32), the cached bf16 weights, or autocast."""
    if dtype is None:
        return contextlib.nullcontext()
    if weights is not None:
        return weights.autocast()
    return torch.autocast(device_type, dtype=dtype)


class _GradBuffer:
    """The fp32 gradient tensor of one master from the last step, kept past zero_grad's
    set_to_none: the next step's first gradient is written into it instead of into fresh
    memory (a 40M model's fp32 gradients are ~160 MB of pages faulted in and unmapped again
    every step otherwise)."""

    def __init__(self) -> None:
        self.tensor: Tensor | None = None

    def fp32_grad(self, master: Tensor, grad: Tensor) -> Tensor:
        """grad (bf16) as master's dtype; in the kept tensor when master has no gradient yet
        (the first micro-batch; later ones are summed into master.grad by autograd)."""
        buf, self.tensor = self.tensor, None  # no reference left: autograd adopts it as .grad
        if buf is None or master.grad is not None or buf.shape != master.shape:
            return grad.to(master.dtype)
        return buf.copy_(grad)


class _CachedCast(torch.autograd.Function):
    """master fp32 -> its cached bf16 copy (an alias of the buffer), gradient back in fp32."""

    @staticmethod
    def forward(ctx: Any, master: Tensor, cache: Tensor, grad_buffer: _GradBuffer) -> Tensor:
        ctx.master, ctx.grad_buffer = master, grad_buffer  # a parameter: lives on anyway
        return cache.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.grad_buffer.fp32_grad(ctx.master, grad), None, None


def _matmul_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight that a matmul reads, each parameter once,
    lm_head's (tied or not) aside."""
    head = getattr(model, "lm_head", None)
    out, seen = [], {id(head.weight)} if head is not None else set()
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            names: tuple[str, ...] = ("weight",)
        elif isinstance(module, ExpertBank):
            names = _EXPERT_WEIGHTS
        else:
            continue
        for name in names:
            p = module._parameters.get(name)
            if p is not None and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                out.append((module, name))
    return out


class Bf16Weights:
    """The bf16 copies of `model`'s matmul weights (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """optimizer: the one that updates model's weights; each of its steps stales the copies."""
        self.dtype = dtype
        self._slots = _matmul_weights(model)
        self._cache: list[Tensor | None] = [None] * len(self._slots)
        self._cast_from: list[tuple[int, int, int] | None] = [None] * len(self._slots)
        self._grads = [_GradBuffer() for _ in self._slots]
        self.casts = 0  # weights cast so far (tests read it)
        if optimizer is not None:
            optimizer.register_step_post_hook(lambda *_: self._after_step())

    def _after_step(self) -> None:
        """The masters moved: re-cast before the next use; keep their gradient tensors."""
        self.invalidate()
        for i, buffer in enumerate(self._grads):
            buffer.tensor = self._master(i).grad

    def invalidate(self) -> None:
        """Re-cast every weight before the next use (the masters were updated in place)."""
        self._cast_from = [None] * len(self._slots)

    def _master(self, i: int) -> Tensor:
        module, name = self._slots[i]
        return module._parameters[name]

    @torch.no_grad()
    def refresh(self) -> int:
        """Re-cast every weight whose master changed since its last cast; returns how many."""
        recast = 0
        for i in range(len(self._slots)):
            master = self._master(i)
            key = (id(master), master._version, master.data_ptr())
            if self._cast_from[i] == key:
                continue
            cache = self._cache[i]
            if cache is None or cache.shape != master.shape or cache.device != master.device:
                cache = self._cache[i] = torch.empty_like(master, dtype=self.dtype)
            cache.copy_(master)
            self._cast_from[i] = key
            recast += 1
        self.casts += recast
        return recast

    def cached(self, module: nn.Module, name: str) -> Tensor:
        """The current bf16 copy of module.<name> (after a refresh); for tests and checks."""
        self.refresh()
        return self._cache[self._slots.index((module, name))]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the model's matmul weights are their bf16 copies (differentiable into the
        fp32 masters when grad is enabled); the masters are back in place on exit."""
        self.refresh()
        masters = [self._master(i) for i in range(len(self._slots))]
        grad = torch.is_grad_enabled()
        try:
            for i, ((module, name), master) in enumerate(zip(self._slots, masters)):
                cache = self._cache[i]
                if grad and master.requires_grad:
                    cache = _CachedCast.apply(master, cache, self._grads[i])
                module._parameters[name] = cache
            yield
        finally:
            for (module, name), master in zip(self._slots, masters):
                module._parameters[name] = master

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """CPU autocast in this dtype with the cached weights swapped in."""
        with torch.autocast("cpu", dtype=self.dtype), self.swapped():
            yield
