"""One sample in flight in the embedded engine, and its finish checks.

A `Sequence` is one of the n samples of a request: its prompt, the tokens generated so far
with their logprobs and weight versions, its KV-cache slot while it runs, and how it
finished. `StopRule` holds the finish conditions resolved once at admission: stop token ids
(the request's plus the tokenizer's EOS ids unless `ignore_eos`, as SGLang), stop strings
(matched on the decoded tail of the output, checked incrementally after every token, with
SGLang's window of `max stop-string length in tokens + 1` tokens), and max_new_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from rollout.types import GenerateOutput, SamplingParams

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class StopRule:
    """Finish conditions of one request."""

    stop_ids: frozenset[int]
    stop_strs: tuple[str, ...]
    tail_tokens: int  # decode this many last output tokens to look for a stop string
    max_new_tokens: int

    @classmethod
    def build(
        cls,
        params: SamplingParams,
        eos_ids: frozenset[int],
        encode: Callable[[str], list[int]] | None,
    ) -> StopRule:
        ids = frozenset() if params.ignore_eos else frozenset(params.stop_token_ids) | eos_ids
        strs = tuple(params.stop)
        if strs and encode is None:
            raise ValueError("stop: stop strings need a tokenizer; this engine has none")
        tail = max((len(encode(s)) for s in strs), default=0) + 1 if strs else 0
        return cls(ids, strs, tail, params.max_new_tokens)


@dataclass
class Sequence:
    """One sample: state owned by the engine thread until it finishes."""

    rid: str
    group: str  # the request's rid: aborting it aborts every sample of the request
    prompt_ids: list[int]
    params: SamplingParams
    stop: StopRule
    seed: int
    return_logprob: bool = True
    return_text: bool = True  # False: to_output leaves text None (the caller decodes)
    top_logprobs_num: int = 0  # > 0: record this many most likely tokens per position
    on_update: Callable[[Sequence], None] | None = None  # engine thread, after each token
    done: Future[Sequence] | None = None  # resolved with the sequence when it finishes
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token
    slot: int | None = None
    cached: int = 0  # tokens of this sequence whose K/V are in its slot
    finish_reason: str | None = None
    matched: int | str | None = None
    num_retractions: int = 0
    created: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    routing_start: int | None = None  # record experts from this position (None: do not)
    routing: list[np.ndarray] = field(default_factory=list)  # chunks of [n, n_moe, k]
    routed_len: int = 0  # rows recorded: positions routing_start .. routing_start + this - 1

    def record_routing(self, routes: np.ndarray, first: int) -> None:
        """Keep the experts [L, n_moe, k] of positions first .. first+L-1 that are not yet
        recorded. A row once recorded stays: a re-prefill after a retraction (or across a
        weight update) routes the same tokens again, but they were sampled under the first."""
        if self.routing_start is None:
            return
        want = self.routing_start + self.routed_len
        end = first + len(routes)
        if end <= want:
            return
        if first > want:
            raise RuntimeError(f"{self.rid}: routing of positions {want}..{first - 1} was lost")
        self.routing.append(routes[want - first :])
        self.routed_len += end - want

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def finish(self, reason: str, matched: int | str | None = None) -> None:
        self.finish_reason = reason
        self.matched = matched
        self.finished_at = time.monotonic()

    def append(self, token: int, logprob: float, version: int, decode: Decode | None) -> None:
        """Record one generated token and finish the sequence if a stop condition holds."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)
        if token in self.stop.stop_ids:
            self.finish("stop", token)
        elif self.stop.stop_strs and decode is not None:
            tail = decode(self.output_ids[-self.stop.tail_tokens :])
            for s in self.stop.stop_strs:
                if s in tail:
                    self.finish("stop", s)
                    break
        if not self.finished and len(self.output_ids) >= self.stop.max_new_tokens:
            self.finish("length", len(self.output_ids))

    def to_output(self, decode: Decode | None = None) -> GenerateOutput:
        """The GenerateOutput of this sample (text decoded if `decode` is given)."""
        text = None
        if decode is not None and self.return_text:
            text = decode(self.output_ids)
            if isinstance(self.matched, str) and self.finish_reason == "stop":
                cut = text.find(self.matched)
                text = text[:cut] if cut >= 0 else text
        return GenerateOutput(
            rid=self.rid,
            prompt_ids=list(self.prompt_ids),
            output_ids=list(self.output_ids),
            logprobs=list(self.logprobs),  # always computed, so always returned in-process
            versions=list(self.versions),
            finish_reason=self.finish_reason or "abort",
            matched_stop=self.matched if self.finish_reason == "stop" else None,
            text=text,
            routed_experts=self.routed(),
            routed_experts_start=self.routing_start or 0,
            top_logprobs=[list(t) for t in self.top_logprobs] if self.top_logprobs_num else None,
        )

    def routed(self) -> np.ndarray | None:
        """The recorded experts [N, n_moe, k] (uint8/uint16), None when not asked."""
        if self.routing_start is None:
            return None
        if not self.routing:
            return np.zeros((0, 0, 0), np.uint8)
        return np.concatenate(self.routing)
