"""The embedded rollout engine: a background thread runs the continuous-batching loop.

`EmbeddedEngine` implements `rollout.types.Engine` in-process. Callers on an asyncio loop
submit requests and control commands; the engine thread applies commands strictly *between*
two scheduler steps (so a weight update lands between two decode steps and sequences in
flight continue with the new weights: a partial rollout, visible in their per-token
versions), then runs one step, then resolves the futures of finished sequences. The thread
sleeps on its command queue while there is nothing to do.

Logprobs are `log_softmax(logits / T)[token]`, T = 1 for greedy, without top-k/top-p
renormalisation: see rollout/embedded/sampler.py and buffer/episode.py.

Samples of one request with n > 1 get rids `f"{rid}_{j}"` (SGLang's naming); aborting the
request's rid aborts all of them. Sample j of a request with `sampling_seed = s` uses seed
`s` for j = 0 and a seed derived from (s, j) otherwise, so the n samples differ but are
reproducible.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from models.fp8 import quantize_model_
from models.weight_update import WeightUpdate, apply_weight_update
from rollout.embedded.scheduler import Scheduler
from rollout.embedded.sequence import Decode, Sequence, StopRule
from rollout.embedded.weights import mark_weights_changed
from rollout.types import PAUSE_MODES, GenerateOutput, GenerateRequest

logger = logging.getLogger(__name__)

_SEED_MIX = 0x9E3779B97F4A7C15


class EngineBusyError(RuntimeError):
    """flush_cache refused: requests are running (or queued while not paused)."""


class EngineStoppedError(RuntimeError):
    """The engine thread is not running (shut down, or it failed: see the message)."""


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request whose sampling_seed is `seed`."""
    return seed if index == 0 else (seed * 6364136223846793005 + index * _SEED_MIX) % (1 << 63)


class EmbeddedEngine:
    """Continuous-batching generation on an in-process `Glm4MoeForCausalLM`.

    model           a models.Glm4MoeForCausalLM (optionally FP8, see `fp8`)
    tokenizer       a HF tokenizer for stop strings, EOS ids and output text; None = ids only
    eos_token_ids   stop ids added to every request unless ignore_eos; default: the
                    tokenizer's stop ids (models.tokenizer.stop_token_ids) or config.eos_token_id
    max_running     KV slots = the most sequences decoded at once
    context_len     positions per slot; prompt + max_new_tokens must fit (else 400 upstream)
    fp8             quantize the model's linear weights blockwise to FP8 first
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tokenizer: Any = None,
        eos_token_ids: list[int] | None = None,
        max_running: int = 64,
        context_len: int | None = None,
        max_prefill_tokens: int = 4096,
        kv_dtype: torch.dtype | None = None,
        fp8: bool = False,
        version: int = 0,
        seed: int | None = None,
        name: str = "embedded",
    ) -> None:
        if fp8:
            quantize_model_(model)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        config = getattr(model, "config", None)
        max_pos = int(getattr(config, "max_position_embeddings", 2048))
        context_len = min(max_pos, 2048) if context_len is None else context_len
        if context_len > max_pos:
            raise ValueError(
                f"context_len: {context_len} exceeds max_position_embeddings {max_pos}"
            )
        self.eos_ids = frozenset(self._default_eos(eos_token_ids, config))
        self.sched = Scheduler(
            model,
            max_running=max_running,
            context_len=context_len,
            max_prefill_tokens=max_prefill_tokens,
            kv_dtype=kv_dtype,
            decode=self._decode_tail if tokenizer is not None else None,
            version=version,
        )
        self._rng = random.Random(seed)
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()
        logger.info(
            "%s: engine up: %d slots x %d positions, fp8=%s, eos=%s",
            name,
            max_running,
            context_len,
            fp8,
            sorted(self.eos_ids),
        )

    def _default_eos(self, given: list[int] | None, config: Any) -> list[int]:
        if given is not None:
            return list(given)
        if self.tokenizer is not None:
            from models.tokenizer import stop_token_ids  # imports transformers: only if needed

            return list(stop_token_ids(self.tokenizer))
        eos = getattr(config, "eos_token_id", None)
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- text ------------------------------------------------------------------------------

    def _decode_tail(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_text(self, ids: list[int]) -> str | None:
        """Output text as SGLang returns it (special tokens skipped); None without tokenizer."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._drain(block=not self.sched.has_work):
                break
            if not self.sched.has_work:
                continue
            try:
                finished = self.sched.step()
            except Exception as e:  # a failing forward must not hang every caller
                logger.exception("%s: scheduler step failed", self.name)
                self._fail_all(e)
                continue
            self._deliver(finished)
        self._deliver(self.sched.abort(lambda s: True))

    def _drain(self, block: bool) -> bool:
        """Run queued commands (waiting for one if `block`); False once asked to stop."""
        while True:
            try:
                item = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _deliver(self, finished: list[Sequence]) -> None:
        for seq in finished:
            if seq.done is not None and not seq.done.done():
                seq.done.set_result(seq)

    def _fail_all(self, error: Exception) -> None:
        seqs = [*self.sched.waiting, *self.sched.running]
        self.sched.abort(lambda s: True)
        for seq in seqs:
            if seq.done is not None and not seq.done.done():
                seq.done.set_exception(error)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn()` on the engine thread between two steps; a Future of its result."""
        if self._stopped or not self._thread.is_alive():
            raise EngineStoppedError(f"{self.name}: engine is stopped")
        fut: Future[Any] = Future()
        self._commands.put((fn, fut))
        return fut

    async def _acall(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    # ---- requests --------------------------------------------------------------------------

    def make_sequences(
        self,
        request: GenerateRequest,
        on_update: Callable[[Sequence], None] | None = None,
    ) -> list[Sequence]:
        """The n Sequences of a request, validated (raises ValueError naming the field)."""
        params = request.sampling
        params.validate()
        prompt = [int(t) for t in request.input_ids]
        self.sched.check_length(len(prompt), params.max_new_tokens)
        stop = StopRule.build(params, self.eos_ids, self._encode if self.tokenizer else None)
        rid = request.rid or uuid.uuid4().hex
        routing_start = self._routing_start(request, len(prompt))
        top_n = request.top_logprobs_num
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
            raise ValueError(f"top_logprobs_num: expected an int >= 0, got {top_n!r}")
        base = params.sampling_seed
        if base is None:
            base = self._rng.getrandbits(63)
        seqs = []
        for j in range(params.n):
            seqs.append(
                Sequence(
                    rid=rid if params.n == 1 else f"{rid}_{j}",
                    group=rid,
                    prompt_ids=prompt,
                    params=params,
                    stop=stop,
                    seed=sample_seed(base, j),
                    return_logprob=request.return_logprob,
                    top_logprobs_num=top_n,
                    on_update=on_update,
                    done=Future(),
                    routing_start=routing_start,
                )
            )
        return seqs

    @staticmethod
    def _routing_start(request: GenerateRequest, prompt_len: int) -> int | None:
        """The first position whose experts the request wants (R3), None when it wants none."""
        if not request.return_routed_experts:
            return None
        start = request.routed_experts_start_len
        if start is None:
            return prompt_len
        if not 0 <= start <= prompt_len:
            raise ValueError(
                f"routed_experts_start_len: expected 0..{prompt_len} (the prompt length), "
                f"got {start}"
            )
        return start

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (from make_sequences); each `seq.done` resolves when it finishes."""

        def add() -> None:
            for seq in seqs:
                self._deliver(self.sched.add(seq))

        self.call(add)

    async def wait(self, seqs: list[Sequence]) -> list[Sequence]:
        """Await the sequences; if the caller is cancelled, abort them."""
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(s.done) for s in seqs)))
        except asyncio.CancelledError:
            targets = {id(s) for s in seqs}
            if not self._stopped:
                self.call(lambda: self._deliver(self.sched.abort(lambda s: id(s) in targets)))
            raise

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Outputs in request order; the n samples of a request are consecutive."""
        seqs = [s for r in requests for s in self.make_sequences(r)]
        self.submit(seqs)
        done = await self.wait(seqs)
        decode: Decode | None = self.decode_text if self.tokenizer is not None else None
        return [s.to_output(decode) for s in done]

    # ---- control ---------------------------------------------------------------------------

    def submit_update(self, update: WeightUpdate) -> Future[None]:
        """Queue a weight update (from any thread, without waiting); it is applied before the
        next scheduler step. The Future resolves once the new weights are in place."""

        def apply() -> None:
            apply_weight_update(self.model, update)
            mark_weights_changed(self.model)
            self.sched.version = int(update.version)
            logger.info("%s: weights updated to version %d", self.name, self.sched.version)

        return self.call(apply)

    async def update_weights(self, update: WeightUpdate) -> None:
        """Apply a models.weight_update.WeightUpdate between two decode steps."""
        await asyncio.wrap_future(self.submit_update(update))

    async def run_between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between two steps (e.g. loading named tensors)."""
        return await self._acall(fn)

    def _pause_abort(self) -> None:
        self._deliver(self.sched.abort(lambda s: True))

    def _pause_retract(self) -> None:
        self.sched.retract_all()

    def _pause_in_place(self) -> None:
        pass

    async def pause(self, mode: str = "abort") -> None:
        """Stop stepping. abort: finish everything in flight with "abort"; retract: free the
        running sequences' KV (they re-prefill on resume); in_place: keep their KV."""
        actions = {
            "abort": self._pause_abort,
            "retract": self._pause_retract,
            "in_place": self._pause_in_place,
        }
        if mode not in actions:
            raise ValueError(f"mode: expected one of {list(PAUSE_MODES)}, got {mode!r}")

        def pause() -> None:
            actions[mode]()
            self.sched.paused = True
            logger.info("%s: paused (mode %s)", self.name, mode)

        await self._acall(pause)

    async def resume(self) -> None:
        def resume() -> None:
            self.sched.paused = False
            logger.info("%s: resumed", self.name)

        await self._acall(resume)

    async def abort(self, rids: list[str] | None = None) -> None:
        """Abort the given request (or sample) rids; None aborts everything in flight."""
        wanted = None if rids is None else set(rids)

        def match(s: Sequence) -> bool:
            return wanted is None or s.rid in wanted or s.group in wanted

        await self._acall(lambda: self._deliver(self.sched.abort(match)))

    async def flush_cache(self) -> None:
        """Reset the KV slots; raises EngineBusyError while requests run (as SGLang's 400)."""
        if not await self._acall(self.sched.flush):
            raise EngineBusyError(
                f"{self.name}: cache not flushed: {len(self.sched.running)} running, "
                f"{len(self.sched.waiting)} waiting requests"
            )

    async def set_weight_version(self, version: int) -> None:
        def set_version() -> None:
            self.sched.version = int(version)

        await self._acall(set_version)

    async def health(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    async def weight_version(self) -> int:
        return self.sched.version

    @property
    def paused(self) -> bool:
        return self.sched.paused

    def stats(self) -> dict[str, int]:
        """Queue sizes and counters (read without locking; approximate while running)."""
        return {
            "num_running": len(self.sched.running),
            "num_waiting": len(self.sched.waiting),
            "num_free_slots": self.sched.slots.num_free,
            "num_forwards": self.sched.num_forwards,
            "weight_version": self.sched.version,
        }

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and stop the engine thread."""
        if self._stopped:
            return
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout)
