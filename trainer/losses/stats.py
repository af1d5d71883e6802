"""Step metrics accumulated over micro-batches and ranks, then finalised once per step.

Each metric has a reduction: `mean` (a sum and a count, e.g. clip fraction over trainable
tokens), `sum` (e.g. a loss part: each micro-batch holds its share of the step's loss), `max`
and `min`. Values are detached float64 scalars; `all_reduce` merges ranks with two collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

AllReduce = Callable[[Tensor, str], None]
"""all_reduce(tensor, op) in place, op "sum" | "max"."""


def _scalar(x: Tensor | float) -> Tensor:
    """x as a detached float64 0-d tensor; each tensor op skipped where it would change
    nothing (~40 calls a step: the dispatcher, not the arithmetic, is their cost)."""
    if not isinstance(x, Tensor):  # rare (identities): as_tensor's dtype, as before
        return torch.as_tensor(x).to(torch.float64).reshape(())
    if x.requires_grad:
        x = x.detach()
    if x.dtype != torch.float64:
        x = x.to(torch.float64)
    return x if x.dim() == 0 else x.reshape(())


@dataclass
class StatSums:
    """Running metrics: name -> accumulated tensors (see the module docstring)."""

    means: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)
    maxes: dict[str, Tensor] = field(default_factory=dict)
    mins: dict[str, Tensor] = field(default_factory=dict)

    def add_mean(self, name: str, total: Tensor | float, count: Tensor | float) -> None:
        total, count = _scalar(total), _scalar(count)
        old = self.means.get(name)  # a first value is stored as is: no 0.0 + x per metric
        self.means[name] = (total, count) if old is None else (old[0] + total, old[1] + count)

    def add_masked_mean(self, name: str, values: Tensor, mask: Tensor) -> None:
        """Accumulate the mean of `values` [T] over the positions where mask > 0."""
        values = values.detach()
        self.add_mean(name, (values * mask).sum(), mask.sum())

    def add_masked_means(self, values: dict[str, Tensor], mask: Tensor) -> None:
        """add_masked_mean of several metrics [T] over one mask: one stacked product and row
        sum and one count instead of a few tensor ops per metric (the same sums)."""
        if not values:
            return
        stacked = torch.stack([v.detach() for v in values.values()])  # [M, T]
        totals = (stacked * mask).sum(dim=1).to(torch.float64)
        count = _scalar(mask.sum())
        for name, total in zip(values, totals.unbind(), strict=True):
            self.add_mean(name, total, count)

    def add_sum(self, name: str, value: Tensor | float) -> None:
        value, old = _scalar(value), self.sums.get(name)
        self.sums[name] = value if old is None else old + value

    def add_max(self, name: str, value: Tensor | float) -> None:
        value = _scalar(value)
        self.maxes[name] = torch.maximum(self.maxes[name], value) if name in self.maxes else value

    def add_min(self, name: str, value: Tensor | float) -> None:
        value = _scalar(value)
        self.mins[name] = torch.minimum(self.mins[name], value) if name in self.mins else value

    def add_masked_extremes(self, name: str, values: Tensor, mask: Tensor) -> None:
        """Record `<name>_max` and `<name>_min` of values [T] where mask > 0 (±inf if none)."""
        values = values.detach()
        selected = mask > 0
        inf = torch.full_like(values, float("inf"))
        self.add_max(f"{name}_max", torch.where(selected, values, -inf).max())
        self.add_min(f"{name}_min", torch.where(selected, values, inf).min())

    def merge(self, other: StatSums) -> None:
        for name, (total, count) in other.means.items():
            self.add_mean(name, total, count)
        for name, value in other.sums.items():
            self.add_sum(name, value)
        for name, value in other.maxes.items():
            self.add_max(name, value)
        for name, value in other.mins.items():
            self.add_min(name, value)

    def names(self) -> dict[str, list[str]]:
        """The metric names per reduction (to align ranks before `all_reduce`)."""
        return {
            "means": sorted(self.means),
            "sums": sorted(self.sums),
            "maxes": sorted(self.maxes),
            "mins": sorted(self.mins),
        }

    def include(self, names: dict[str, list[str]]) -> None:
        """Add the identity of each missing metric (0 for mean/sum, -inf max, +inf min)."""
        for n in names["means"]:
            self.add_mean(n, 0.0, 0.0)
        for n in names["sums"]:
            self.add_sum(n, 0.0)
        for n in names["maxes"]:
            self.add_max(n, -math.inf)
        for n in names["mins"]:
            self.add_min(n, math.inf)

    def all_reduce(self, reduce: AllReduce) -> None:
        """Combine across ranks. Every rank must hold the same metric names (sorted order)."""
        mean_names, sum_names = sorted(self.means), sorted(self.sums)
        max_names, min_names = sorted(self.maxes), sorted(self.mins)
        flat = [v for n in mean_names for v in self.means[n]] + [self.sums[n] for n in sum_names]
        if flat:  # on the CPU: the parts may sit on a GPU or (identities, floats) on the CPU
            packed = torch.stack([t.cpu() for t in flat])
            reduce(packed, "sum")
            for i, n in enumerate(mean_names):
                self.means[n] = (packed[2 * i], packed[2 * i + 1])
            offset = 2 * len(mean_names)
            for i, n in enumerate(sum_names):
                self.sums[n] = packed[offset + i]
        extremes = [self.maxes[n] for n in max_names] + [-self.mins[n] for n in min_names]
        if extremes:
            packed = torch.stack([t.cpu() for t in extremes])
            reduce(packed, "max")
            for i, n in enumerate(max_names):
                self.maxes[n] = packed[i]
            for i, n in enumerate(min_names):
                self.mins[n] = -packed[len(max_names) + i]

    def finalize(self) -> dict[str, float]:
        """Plain floats: means divided by their counts. An empty mean, max or min is 0.0."""
        out = {n: float(t / c) if float(c) > 0 else 0.0 for n, (t, c) in self.means.items()}
        out.update({n: float(v) for n, v in self.sums.items()})
        for table in (self.maxes, self.mins):
            out.update({n: float(v) if math.isfinite(float(v)) else 0.0 for n, v in table.items()})
        return out
