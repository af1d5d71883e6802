"""The continuous-batching core of the embedded engine (synchronous; one thread calls it).

Each `step()`:
  1. admits waiting sequences into free KV slots (up to `max_prefill_tokens` new tokens);
  2. prefills the newcomers in padded chunks (fresh sequences admitted together with the same
     prompt, e.g. the n samples of a request or the n single-sample requests a rollout sends
     per prompt, are prefilled once and their K/V copied to the other slots) and samples
     their first token;
  3. runs one decode forward over every other running sequence (one new token each) and
     samples the next token of each;
  4. finished sequences leave at once and their slots are reused.
Per-step Python work is O(batch); sampling is vectorised (sampler.py) and there is one host
sync per forward (the sampled ids and logprobs). Every token records `self.version`, the
weight version in force for the forward that produced it. When a sequence in a forward asks
for its experts (R3), the forward captures them (one more host copy, as compact uint8/uint16)
and each sequence keeps the rows of the positions it asked for.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from buffer.episode import routing_dtype
from models.moe import RoutingCapture
from rollout.embedded.kv_slots import SlotPool
from rollout.embedded.prompt_share import Pairs, pair_with_leaders, share_key, share_prefills
from rollout.embedded.sampler import sample, sample_greedy, sample_with_top
from rollout.embedded.sequence import Decode, Sequence

logger = logging.getLogger(__name__)


def _slot_of(seq: Sequence) -> int:
    return seq.slot if seq.slot is not None else -1


class ContextLengthError(ValueError):
    """Prompt plus max_new_tokens exceeds the engine's context length (SGLang's message)."""


class Scheduler:
    """Waiting queue, running batch and KV slots of one model."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_running: int,
        context_len: int,
        max_prefill_tokens: int = 4096,
        kv_dtype: torch.dtype | None = None,
        decode: Decode | None = None,
        version: int = 0,
        fold_prefill_tokens: int = 0,
    ) -> None:
        if context_len < 2:
            raise ValueError(f"context_len: expected >= 2, got {context_len}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens: expected >= 1, got {max_prefill_tokens}")
        self.model = model
        cache = model.new_kv_cache(max_running, context_len, dtype=kv_dtype)
        # the cache is on the model's device, and so are the per-slot sampling tensors
        device = getattr(model, "device", torch.device("cpu"))
        self.slots = SlotPool(cache, max_running, context_len, device=device)
        self.context_len = context_len
        self.max_prefill_tokens = max_prefill_tokens
        if fold_prefill_tokens < 0:
            raise ValueError(f"fold_prefill_tokens: expected >= 0, got {fold_prefill_tokens}")
        # newcomers with at most this many prefill tokens (all rows) join a decode step's
        # forward as one-token rows instead of a forward of their own (0: never)
        self.fold_prefill_tokens = fold_prefill_tokens
        self.num_folded_prefills = 0  # decode forwards that also prefilled newcomers
        self.decode = decode
        self.version = version
        self.paused = False
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_forwards = 0
        self.num_prefill_rows = 0  # rows prefilled (a shared prompt counts once)
        self.num_prefill_forwards = 0
        self.num_decode_forwards = 0
        self.num_decode_rows = 0  # / num_decode_forwards = the mean decode batch
        # decode forwards by batch size: bucket i holds batches of 2**(i-1) < size <= 2**i
        self.decode_batch_hist = [0] * 12
        # seconds on the engine thread by phase (perf_counter; cheap next to a forward)
        self.seconds = {"prefill": 0.0, "decode": 0.0, "sample": 0.0}
        # the model's decode weights, re-checked (DecodeWeights.key_of, ~5 % of a toy step)
        # only after something may have changed them: the engine sets weights_stale
        self._live: object | None = None
        self.weights_stale = True

    # ---- queue management ------------------------------------------------------------------

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ContextLengthError if a request cannot fit in one slot (SGLang's wording)."""
        if prompt_len < 1:
            raise ValueError("input_ids: expected at least one prompt token, got none")
        total = prompt_len + max_new_tokens
        if total > self.context_len:
            raise ContextLengthError(
                "Requested token count exceeds the model's maximum context length of "
                f"{self.context_len} tokens. You requested a total of {total} tokens: "
                f"{prompt_len} tokens from the input messages and {max_new_tokens} tokens "
                "for the completion. Please reduce the number of tokens in the input "
                "messages or the completion to fit within the limit."
            )

    def add(self, seq: Sequence) -> list[Sequence]:
        """Queue a sequence; returns it as finished at once if it asks for 0 new tokens."""
        self.check_length(len(seq.prompt_ids), seq.stop.max_new_tokens)
        if seq.stop.max_new_tokens == 0:
            seq.finish("length", 0)
            return [seq]
        self.waiting.append(seq)
        return []

    @property
    def has_work(self) -> bool:
        return not self.paused and bool(self.waiting or self.running)

    @property
    def idle(self) -> bool:
        """No sequence holds a slot and (unless paused) none waits: flush_cache may run."""
        return not self.running and (self.paused or not self.waiting)

    def abort(self, match: Callable[[Sequence], bool]) -> list[Sequence]:
        """Finish every waiting or running sequence matching `match` with reason "abort"."""
        hit = [s for s in (*self.waiting, *self.running) if match(s)]
        for seq in hit:
            seq.finish("abort")
        self.waiting = deque(s for s in self.waiting if not s.finished)
        self._drop_finished()
        return hit

    def retract_all(self) -> int:
        """Move running sequences back to the front of the queue, freeing their KV slots.

        They keep their tokens; on re-admission their prompt + output is prefilled again.
        """
        retracted = self.running
        for seq in retracted:
            self._release(seq)
            seq.num_retractions += 1
        self.running = []
        self.waiting.extendleft(reversed(retracted))
        return len(retracted)

    def live_weights(self) -> object | None:
        """The model's current decode weights (None for a model without decode_weights)."""
        if not hasattr(self.model, "decode_weights"):
            return None
        if self.weights_stale or self._live is None:
            self._live = self.model.decode_weights()
            self.weights_stale = False
        return self._live

    def flush(self) -> bool:
        """Forget every slot assignment when idle; False (nothing done) otherwise."""
        if not self.idle:
            return False
        self.slots.reset()
        return True

    # ---- the step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One scheduling iteration; returns the sequences that finished in it."""
        if self.paused:
            return []
        newcomers = self._admit()
        decoding = sorted((s for s in self.running if s.cached > 0), key=_slot_of)
        self.running.extend(newcomers)
        finished: list[Sequence] = []
        fold = self._fold_plan(newcomers) if newcomers and decoding else None
        if fold is not None:
            finished += self._fold_step(decoding, *fold)
        else:
            if newcomers:
                finished += self._prefill(newcomers)
            if decoding:
                finished += self._decode_step(decoding)
        self._drop_finished()
        return finished

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences into free slots while their prefill fits the token budget;
        a fresh sequence whose prompt an admitted one prefills already costs nothing."""
        admitted: list[Sequence] = []
        charged: set[tuple] = set()
        budget = self.max_prefill_tokens
        while self.waiting and self.slots.num_free:
            seq = self.waiting[0]
            key = share_key(seq)
            cost = 0 if key is not None and key in charged else seq.num_tokens
            if admitted and cost > budget:
                break
            self.waiting.popleft()
            seq.slot = self.slots.acquire(seq.params, seq.seed, len(seq.output_ids))
            seq.cached = 0
            budget -= cost
            if key is not None:
                charged.add(key)
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill in chunks of similar length; fresh sequences with the same prompt share
        one row (rollout/embedded/prompt_share.py)."""
        pairs, unique = pair_with_leaders(seqs)
        unique.sort(key=lambda s: s.num_tokens)
        logits_of: dict[int, Tensor] = {}
        routes_of: dict[int, np.ndarray] = {}
        self.num_prefill_rows += len(unique)
        for chunk in self._chunks(unique):
            self.num_prefill_forwards += 1
            rows = [s.prompt_ids + s.output_ids for s in chunk]
            t0 = time.perf_counter()
            logits, routes = self._forward(rows, [s.slot for s in chunk], [0] * len(chunk), chunk)
            self.seconds["prefill"] += time.perf_counter() - t0
            for i, seq in enumerate(chunk):
                seq.cached = len(rows[i])
                logits_of[id(seq)] = logits[i]
                if routes is not None:
                    routes_of[id(seq)] = routes[i, : len(rows[i])]
        stacked = share_prefills(self.slots.cache, pairs, logits_of, routes_of)
        return self._sample_append([s for s, _ in pairs], stacked)

    def _fold_plan(self, newcomers: list[Sequence]) -> tuple[Pairs, list[Sequence]] | None:
        """The newcomers paired with their leaders when their prefill (one row per distinct
        prompt) is small enough to ride in the decode step's forward; else None."""
        if not self.fold_prefill_tokens:
            return None
        pairs, unique = pair_with_leaders(newcomers)
        if sum(s.num_tokens for s in unique) > self.fold_prefill_tokens:
            return None
        return pairs, unique

    def _fold_step(
        self, decoding: list[Sequence], pairs: Pairs, unique: list[Sequence]
    ) -> list[Sequence]:
        """One forward for the decode step and the newcomers' prefill: every prompt token is
        a one-token row of its leader's slot at its own position (the layer writes the K/V of
        all rows before any row attends, so row j sees positions 0..j of its prompt), then
        one sampling call for everyone. Saves a forward's fixed cost per admission."""
        rows = [[s.output_ids[-1]] for s in decoding]
        slots = [s.slot for s in decoding]
        starts = [s.cached for s in decoding]
        spans = []
        for lead in unique:
            tokens = lead.prompt_ids + lead.output_ids
            spans.append((len(rows), len(tokens)))
            rows += [[t] for t in tokens]
            slots += [lead.slot] * len(tokens)
            starts += range(len(tokens))
        self.num_folded_prefills += 1
        self.num_prefill_rows += len(unique)
        self.num_decode_forwards += 1
        self.num_decode_rows += len(decoding)
        self.decode_batch_hist[min((len(decoding) - 1).bit_length(), 11)] += 1
        t0 = time.perf_counter()
        logits, routes = self._forward(rows, slots, starts, [*decoding, *unique])
        self.seconds["decode"] += time.perf_counter() - t0
        for i, seq in enumerate(decoding):
            if routes is not None:
                seq.record_routing(routes[i], seq.cached)
            seq.cached += 1
        logits_of: dict[int, Tensor] = {}
        routes_of: dict[int, np.ndarray] = {}
        for lead, (first, length) in zip(unique, spans, strict=True):
            lead.cached = length
            logits_of[id(lead)] = logits[first + length - 1]
            if routes is not None:
                routes_of[id(lead)] = routes[first : first + length, 0]
        fresh = share_prefills(self.slots.cache, pairs, logits_of, routes_of)
        seqs = [*decoding, *(s for s, _ in pairs)]
        return self._sample_append(seqs, torch.cat([logits[: len(decoding)], fresh]))

    def _chunks(self, seqs: list[Sequence]) -> Iterable[list[Sequence]]:
        """Consecutive groups (sorted by length) whose padded size fits the prefill budget."""
        chunk: list[Sequence] = []
        for seq in seqs:
            if chunk and (len(chunk) + 1) * seq.num_tokens > self.max_prefill_tokens:
                yield chunk
                chunk = []
            chunk.append(seq)
        if chunk:
            yield chunk

    def _decode_step(self, seqs: list[Sequence]) -> list[Sequence]:
        self.num_decode_forwards += 1
        self.num_decode_rows += len(seqs)
        self.decode_batch_hist[min((len(seqs) - 1).bit_length(), 11)] += 1
        rows = [[s.output_ids[-1]] for s in seqs]
        t0 = time.perf_counter()
        logits, routes = self._forward(rows, [s.slot for s in seqs], [s.cached for s in seqs], seqs)
        self.seconds["decode"] += time.perf_counter() - t0
        for i, seq in enumerate(seqs):
            if routes is not None:
                seq.record_routing(routes[i], seq.cached)
            seq.cached += 1
        return self._sample_append(seqs, logits)

    def _forward(
        self, rows: list[list[int]], slots: list[int], start: list[int], seqs: list[Sequence]
    ) -> tuple[Tensor, np.ndarray | None]:
        """One forward_cached call over right-padded rows: float32 logits [B, V] and, when a
        sequence asks for them, the experts used, uint8/uint16 numpy [B, L, n_moe, k]."""
        width = max(len(r) for r in rows)
        if width == 1:  # a decode step: [B, 1] in one op
            ids = torch.tensor(rows, dtype=torch.int64)
        else:
            ids = torch.zeros(len(rows), width, dtype=torch.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        self.num_forwards += 1
        capture = RoutingCapture() if any(s.routing_start is not None for s in seqs) else None
        weights = self.live_weights()
        logits = self.model.forward_cached(
            ids,
            slots,
            start,
            [len(r) for r in rows],
            self.slots.cache,
            routing=capture,
            **({} if weights is None else {"weights": weights}),
        )
        if capture is None or capture.routed_experts is None:
            return logits, None
        dtype = routing_dtype(self.model.config.n_routed_experts)
        routes = capture.routed_experts.permute(1, 2, 0, 3)  # [B, L, n_moe, k]
        return logits, routes.to(torch.int32).cpu().numpy().astype(dtype)

    def _sample_append(self, seqs: list[Sequence], logits: Tensor) -> list[Sequence]:
        t0 = time.perf_counter()
        try:
            return self._sample_append_timed(seqs, logits)
        finally:
            self.seconds["sample"] += time.perf_counter() - t0

    def _sample_append_timed(self, seqs: list[Sequence], logits: Tensor) -> list[Sequence]:
        top_rows = [i for i, s in enumerate(seqs) if s.top_logprobs_num > 0]
        if not top_rows and self.slots.all_greedy:  # no parameters to gather (same values)
            tokens, logprobs = sample_greedy(logits)
            self.slots.advance([s.slot for s in seqs])
            return self._append(seqs, tokens, logprobs)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.int64, device=self.slots.device)
        batch = self.slots.batch(slots)
        if top_rows:  # only requests that asked pay for the top-k (OpenAI's top_logprobs)
            k = max(seqs[i].top_logprobs_num for i in top_rows)
            rows = torch.tensor(top_rows, dtype=torch.int64, device=logits.device)
            tokens, logprobs, top_ids, top_lps = sample_with_top(logits, batch, rows, k)
            for r, ids, lps in zip(top_rows, top_ids.tolist(), top_lps.tolist()):
                n = seqs[r].top_logprobs_num
                seqs[r].top_logprobs.append(list(zip(ids[:n], lps[:n])))
        else:
            tokens, logprobs = sample(logits, batch)
        self.slots.advance(slots)
        return self._append(seqs, tokens, logprobs)

    def _append(self, seqs: list[Sequence], tokens: Tensor, logprobs: Tensor) -> list[Sequence]:
        """Each sequence's sampled token and logprob appended; returns those that finished."""
        finished = []
        version = self.version
        for seq, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.append(tok, lp, version, self.decode)
            if seq.finished:
                finished.append(seq)
            elif seq.on_update is not None:
                seq.on_update(seq)
        return finished

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.slots.release(seq.slot)
        seq.slot = None
        seq.cached = 0

    def _drop_finished(self) -> None:
        if any(s.finished for s in self.running):
            for seq in self.running:
                if seq.finished:
                    self._release(seq)
            self.running = [s for s in self.running if not s.finished]
