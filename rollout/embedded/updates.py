"""Weight updates of the embedded engine, applied on its thread between two scheduler steps.

With partial rollouts an update is applied at once (running sequences continue under it).
Without, it waits in `pending` until the sequences running when it arrived have finished
(AReaL's non-interruptible mode); meanwhile the engine admits no waiting sequence.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future

import torch

from models.weight_update import WeightUpdate, apply_weight_update
from rollout.embedded.scheduler import Scheduler
from rollout.embedded.weights import load_in_place

logger = logging.getLogger(__name__)


class WeightUpdates:
    """Applies updates to `model` and sets the scheduler's version (engine thread only)."""

    def __init__(self, model: torch.nn.Module, sched: Scheduler, name: str) -> None:
        self.model, self.sched, self.name = model, sched, name
        # a load writes into these tensors in place, so the list stays valid for the engine's
        # life (an FP8 engine quantized its model before this)
        self._tensors = [*model.parameters(), *model.buffers()]
        self.pending: deque[tuple[WeightUpdate, Future[None]]] = deque()
        self.count = 0
        self.seconds = 0.0  # loading the tensors and refreshing the decode weights

    def apply(self, update: WeightUpdate) -> None:
        t0 = time.perf_counter()
        load_in_place(self.model, lambda: apply_weight_update(self.model, update), self._tensors)
        self.sched.weights_stale = True
        self.sched.version = int(update.version)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        logger.info("%s: weights updated to version %d", self.name, self.sched.version)

    def enqueue(self, update: WeightUpdate, done: Future[None]) -> None:
        self.pending.append((update, done))
        self.apply_if_drained()

    def apply_if_drained(self) -> None:
        """Apply the waiting updates once no sequence is running."""
        while self.pending and not self.sched.running:
            update, done = self.pending.popleft()
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
            _, done = self.pending.popleft()
            if done.set_running_or_notify_cancel():
                done.set_exception(error)
