"""Static KV-cache slots of the embedded engine and the per-slot sampling parameters.

The model's KV cache (`model.new_kv_cache(num_slots, max_len)`) is allocated once; each
running sequence owns one slot until it finishes, then the slot returns to the free list and
is reused without clearing (the model never attends past a row's own length). The lowest free
slot is handed out first, so the running set stays packed at the low slots and a decode
batch (rows ordered by slot) is often one contiguous slot range. Sampling
parameters live in slot-indexed tensors written once at admission, so building a step's
`SamplingBatch` is a gather by the active slots, not a per-row Python loop. They live on the
KV cache's device (the GPU for a GPU engine), next to the logits they are applied to.

The uniform number of every (slot, counter) a sampled sequence can reach is computed once, at
its admission, for all its counters at once (`hash_uniform`, ~70 tiny integer ops), and kept in
a [num_slots, max_len] table: a step then reads its uniforms with one gather instead of
hashing again (the values are the same bits; float32 holds them exactly).
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from rollout.embedded.sampler import SamplingBatch, hash_uniform
from rollout.types import SamplingParams

_INT64_MASK = (1 << 64) - 1
_FILL_CHUNK = 1 << 20  # counters hashed per call when filling the uniform table


def _to_int64(seed: int) -> int:
    seed &= _INT64_MASK
    return seed - (1 << 64) if seed >= 1 << 63 else seed


class SlotPool:
    """`num_slots` slots over a KV cache of `max_len` positions each; the sampling tensors on
    `device` (the cache's)."""

    def __init__(
        self, cache: object, num_slots: int, max_len: int, device: torch.device | str = "cpu"
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
        self.cache = cache
        self.num_slots = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots))  # a min-heap: the lowest free slot goes first
        self._used: set[int] = set()
        self._filtered: set[int] = set()  # used slots with a top-k, top-p or min-p filter
        self._greedy: set[int] = set()  # used slots with temperature 0
        self._scaled: set[int] = set()  # used slots with a temperature other than 1
        self.device = torch.device(device)
        self.temperature = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.min_p = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.counters = torch.zeros(num_slots, dtype=torch.int64, device=device)
        # uniforms[slot, c]: hash_uniform(seed, c) for the counters the slot's sequence can reach
        self.uniforms = torch.zeros(num_slots, max_len, dtype=torch.float32, device=device)
        self._pending: list[tuple[int, int, int, int]] = []  # (slot, seed, first, end counter)
        self._unit: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # _unit_rows

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def all_greedy(self) -> bool:
        """Every used slot has temperature 0 (so does any batch of them): a step needs no
        sampling parameters (sampler.sample_greedy)."""
        return len(self._greedy) == len(self._used)

    def acquire(self, params: SamplingParams, seed: int, counter: int) -> int:
        """Take a free slot for a sequence with these parameters and `counter` tokens so far."""
        if not self._free:
            raise RuntimeError("SlotPool.acquire: no free slot")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        self.temperature[slot] = float(params.temperature)
        self.top_p[slot] = float(params.top_p)
        self.top_k[slot] = int(params.top_k) if params.top_k > 0 else 0
        self.min_p[slot] = float(params.min_p)
        self.seeds[slot] = _to_int64(seed)
        self.counters[slot] = counter
        if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0:
            self._filtered.add(slot)
        if params.temperature <= 0:
            self._greedy.add(slot)
        if float(params.temperature) != 1.0:
            self._scaled.add(slot)
        if params.temperature > 0:  # greedy rows never draw
            end = min(max(params.max_new_tokens, counter + 1), self.max_len)
            self._pending.append((slot, _to_int64(seed), counter, end))
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"SlotPool.release: slot {slot} is not in use")
        self._used.discard(slot)
        for marked in (self._filtered, self._greedy, self._scaled):
            marked.discard(slot)
        heapq.heappush(self._free, slot)

    def reset(self) -> None:
        """Forget every slot assignment (flush_cache on an idle engine)."""
        self._free = list(range(self.num_slots))
        for marked in (self._used, self._filtered, self._greedy, self._scaled):
            marked.clear()
        self._pending = []

    def batch(self, slots: Tensor) -> SamplingBatch:
        """The sampling parameters of rows whose slots are `slots` (int64 [B])."""
        self._fill_uniforms()
        counters = self.counters[slots]
        plain, all_sampled, unit = not self._filtered, not self._greedy, not self._scaled
        if plain and all_sampled and unit:  # an RL rollout's rows: the values of every row
            rows = self._unit_rows(slots.numel())
        else:
            rows = tuple(t[slots] for t in (self.temperature, self.top_p, self.top_k, self.min_p))
        return SamplingBatch(
            *rows,
            seeds=self.seeds[slots],
            counters=counters,
            uniforms=self.uniforms[slots, counters.clamp(max=self.max_len - 1)],
            plain=plain,  # RL rollouts sample plainly: the sampler skips checks
            all_sampled=all_sampled,  # (sets of used slots: what holds for all holds here)
            unit_temperature=unit,
        )

    def _unit_rows(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """temperature 1, top_p 1, top_k 0 (all), min_p 0 for n rows, what the gathers give
        when no used slot is greedy, scaled or filtered: made once per n, not 4 gathers a
        step (shared, so never written to)."""
        rows = self._unit.get(n)
        if rows is None:
            ones = torch.ones(n, dtype=torch.float32, device=self.device)
            top_k = torch.zeros(n, dtype=torch.int64, device=self.device)
            min_p = torch.zeros(n, dtype=torch.float32, device=self.device)
            rows = self._unit[n] = (ones, ones, top_k, min_p)
        return rows

    def _fill_uniforms(self) -> None:
        """Hash the uniforms of every slot admitted since the last batch, a few calls at most
        (each over <= _FILL_CHUNK counters, so long max_new_tokens bound the temporaries)."""
        # a slot released and taken again before any batch: only its last sequence counts
        # (one index_put with duplicate indices would keep either value)
        pending = list({entry[0]: entry for entry in self._pending}.values())
        self._pending = []
        chunk: list[tuple[int, int, int, int]] = []
        size = 0
        for entry in pending:
            if chunk and size + entry[3] - entry[2] > _FILL_CHUNK:
                self._hash_into_table(chunk)
                chunk, size = [], 0
            chunk.append(entry)
            size += entry[3] - entry[2]
        if chunk:
            self._hash_into_table(chunk)

    def _hash_into_table(self, entries: list[tuple[int, int, int, int]]) -> None:
        slots, seeds, first, end = (
            torch.tensor(col, dtype=torch.int64, device=self.device) for col in zip(*entries)
        )
        lengths = end - first
        total = int(lengths.sum())
        starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths, output_size=total)
        counters = torch.arange(total, device=self.device) - starts
        counters += torch.repeat_interleave(first, lengths, output_size=total)
        rows = torch.repeat_interleave(slots, lengths, output_size=total)
        seeds = torch.repeat_interleave(seeds, lengths, output_size=total)
        self.uniforms[rows, counters] = hash_uniform(seeds, counters).to(torch.float32)

    def advance(self, slots: Tensor | list[int]) -> None:
        """One more token generated by each of `slots` (distinct; int64 [B] or a host list)."""
        if isinstance(slots, list) and len(slots) == 1:  # no index tensor to build
            self.counters[slots[0]] += 1
        else:
            self.counters[slots] += 1
