"""Weight updates of the embedded engine, applied on its thread between two scheduler steps.

With partial rollouts an update is applied at once (running sequences continue under it).
Without, it waits in `pending` until the sequences running when it arrived have finished
(AReaL's non-interruptible mode); meanwhile the engine admits no waiting sequence. With
`max_wait_s` too, an update that has waited that long lands anyway and the sequences still
running continue under it, as with partial rollouts: on a long-tailed length distribution the
wait is set by the rare longest answer, and the engine decodes it alone while nothing new is
admitted (bench/long_tail.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future

import torch

from models.weight_update import WeightUpdate, apply_weight_update
from rollout.embedded.scheduler import Scheduler
from rollout.embedded.weights import mark_weights_changed

logger = logging.getLogger(__name__)


class WeightUpdates:
    """Applies updates to `model` and sets the scheduler's version (engine thread only)."""

    def __init__(
        self, model: torch.nn.Module, sched: Scheduler, name: str, max_wait_s: float | None = None
    ) -> None:
        self.model, self.sched, self.name = model, sched, name
        self.max_wait_s = max_wait_s
        # a load writes into these tensors in place, so the list stays valid for the engine's
        # life (an FP8 engine quantized its model before this)
        self._tensors = [*model.parameters(), *model.buffers()]
        # (update, its future, time.monotonic() when it was queued)
        self.pending: deque[tuple[WeightUpdate, Future[None], float]] = deque()
        self.count = 0
        self.seconds = 0.0  # loading the tensors (the decode views rebuild in the next forward)

    def apply(self, update: WeightUpdate) -> None:
        t0 = time.perf_counter()
        apply_weight_update(self.model, update)
        mark_weights_changed(self.model, self._tensors)
        self.sched.weights_stale = True
        self.sched.version = int(update.version)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        logger.info("%s: weights updated to version %d", self.name, self.sched.version)

    def enqueue(self, update: WeightUpdate, done: Future[None]) -> None:
        self.pending.append((update, done, time.monotonic()))
        self.apply_if_drained()

    def _waited_enough(self) -> bool:
        return (
            self.max_wait_s is not None and time.monotonic() - self.pending[0][2] >= self.max_wait_s
        )

    def apply_if_drained(self) -> None:
        """Apply the waiting updates once no sequence is running, or once the oldest has
        waited `max_wait_s` (the running sequences then continue under it)."""
        while self.pending and (not self.sched.running or self._waited_enough()):
            update, done, _ = self.pending.popleft()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                self.apply(update)
            except Exception as e:
                done.set_exception(e)
            else:
                done.set_result(None)

    def fail_pending(self, error: Exception) -> None:
        while self.pending:
            _, done, _ = self.pending.popleft()
            if done.set_running_or_notify_cancel():
                done.set_exception(error)
