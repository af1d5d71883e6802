"""The rollout worker's loop: lease prompts -> generate n samples -> score -> filter -> push.

It runs continuously (asynchrony is the main path). How far ahead it may run is bounded by
its own weight version `w`: it may have pushed at most `(w + max_staleness + 1) * share`
accepted groups, where `share` is its part of the trainer's `prompts_per_step`. So with
`max_staleness: 0` it produces exactly one batch per weight version (synchronous on-policy),
and with 1 it generates batch N+1 while the trainer trains on batch N (slime's train_async).
Groups the trainer drops as stale do not count as pushed (they are owed again), and groups
still generating once they could only be dropped are cancelled, their prompts requeued: on a
long tail these are the groups held up by one long sample, and they held the window shut.
With `max_ready` (rollout.max_ready_groups) it also leases nothing while that many of its
pushed groups wait for the trainer: the window is then spent generating, not waiting.

Nothing here knows about Ray; `physarum` wraps it in an actor.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from buffer.episode import Episode, EpisodeGroup
from buffer.errors import PutCancelledError
from rollout.types import Engine, SamplingParams

log = logging.getLogger(__name__)

GenerateGroup = Callable[[dict[str, Any]], Any]  # async (row) -> list[Episode]


@dataclass
class ProducerStats:
    groups_pushed: int = 0
    groups_filtered: int = 0  # dynamic sampling: all rewards equal
    groups_refused: int = 0  # the lease had expired; the buffer refused the push
    groups_dropped: int = 0  # finished or waiting for room when stopped; prompt requeued
    groups_stale_credit: int = 0  # pushed, then dropped by the trainer as stale: owed again
    groups_stale_aborted: int = 0  # cancelled in flight: too stale to be trained when done
    episodes: int = 0
    episode_errors: int = 0
    generated_tokens: int = 0
    reward_sum: float = 0.0
    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0  # wall time with at least one group in flight
    busy_since: float | None = None
    quota_wait_s: float = 0.0  # wall time with no room under the staleness quota
    quota_since: float | None = None
    in_flight_area: float = 0.0  # integral of the groups in flight over time
    in_flight: int = 0
    in_flight_at: float = field(default_factory=time.monotonic)

    def set_in_flight(self, n: int) -> None:
        now = time.monotonic()
        self.in_flight_area += self.in_flight * (now - self.in_flight_at)
        self.in_flight, self.in_flight_at = n, now

    def set_quota_bound(self, bound: bool) -> None:
        now = time.monotonic()
        if bound and self.quota_since is None:
            self.quota_since = now
        elif not bound and self.quota_since is not None:
            self.quota_wait_s += now - self.quota_since
            self.quota_since = None

    def set_busy(self, busy: bool) -> None:
        now = time.monotonic()
        if busy and self.busy_since is None:
            self.busy_since = now
        elif not busy and self.busy_since is not None:
            self.busy_s += now - self.busy_since
            self.busy_since = None

    def snapshot(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        busy = self.busy_s + (time.monotonic() - self.busy_since if self.busy_since else 0.0)
        return {
            "rollout/groups_pushed": self.groups_pushed,
            "rollout/groups_filtered": self.groups_filtered,
            "rollout/groups_refused": self.groups_refused,
            "rollout/groups_dropped": self.groups_dropped,
            "rollout/groups_stale_credit": self.groups_stale_credit,
            "rollout/groups_stale_aborted": self.groups_stale_aborted,
            "rollout/episode_errors": self.episode_errors,
            "rollout/generated_tokens": self.generated_tokens,
            "rollout/gen_tokens_per_s": self.generated_tokens / max(busy, 1e-9),
            "rollout/produced_tokens_per_s": self.generated_tokens / elapsed,
            "rollout/busy_fraction": busy / elapsed,
            "rollout/reward_mean": self.reward_sum / max(self.episodes, 1),
            # cumulative seconds: differences over a window give shares of it
            "rollout/quota_wait_s": self.quota_wait_s
            + (time.monotonic() - self.quota_since if self.quota_since else 0.0),
            "rollout/in_flight_group_s": self.in_flight_area
            + self.in_flight * (time.monotonic() - self.in_flight_at),
        }


@dataclass
class ProducerPlan:
    """How much to produce: the worker's share of each step and the staleness bound."""

    share: int  # accepted groups per weight version this worker owes the trainer
    max_staleness: int
    prompts_per_lease: int
    over_sampling: float = 1.0
    dynamic_sampling: bool = False
    groups_per_step: int = 0  # the trainer's groups per step, all workers (0: = share)
    max_ready: int = 0  # lease nothing while this many pushed groups wait untaken (0: off)

    def quota(self, weight_version: int) -> int:
        return (weight_version + self.max_staleness + 1) * self.share


def all_rewards_equal(episodes: list[Episode]) -> bool:
    rewards = [e.reward for e in episodes]
    return max(rewards) - min(rewards) < 1e-9


class RolloutProducer:
    """Drives one engine: keeps enough prompt groups in flight to meet the quota."""

    def __init__(
        self,
        *,
        worker_id: str,
        engine: Engine,
        store: Any,  # buffer.store.EpisodeStore (sync client; called from threads)
        generate_group: GenerateGroup,
        score_group: Callable[[list[Episode]], Any],  # async, fills rewards in place
        plan: ProducerPlan,
    ) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.store = store
        self.generate_group = generate_group
        self.score_group = score_group
        self.plan = plan
        self.weight_version = 0
        self.trainer_version = 0  # the buffer's policy version at the last update
        self.stats = ProducerStats()
        # group tasks in flight -> the weight version when their prompt was leased
        self._in_flight: dict[asyncio.Task, int] = {}
        self._doomed: set[str] = set()  # lease ids of groups cancelled as too stale
        self._generating: set[str] = set()  # lease ids of groups not yet generated
        self._wake = asyncio.Event()
        self._stopping = False
        self._cancel_puts = threading.Event()  # read by the put threads

    def set_weight_version(self, version: int) -> None:
        """Called after the engine applied new weights: the quota grows."""
        self.weight_version = version
        self._wake.set()

    def ready_ahead(self) -> int:
        """Groups this worker pushed that the trainer has not taken: a trainer at version t
        has trained t batches and (when they were there) taken batch t + 1."""
        owed = self.stats.groups_pushed - self.stats.groups_stale_credit
        taken = (max(self.trainer_version, self.weight_version) + 1) * self.plan.share
        return owed - taken

    def _room(self) -> int:
        """Groups to lease now: the staleness quota less what is in flight, and none while
        plan.max_ready groups already wait for the trainer. The quota bounds groups in
        flight plus waiting; the cap turns the waiting part into generation in flight (a
        fuller decode batch) and trains groups sooner after their lease (less stale)."""
        if self.plan.max_ready and self.ready_ahead() >= self.plan.max_ready:
            return 0
        owed = self.stats.groups_pushed - self.stats.groups_stale_credit
        remaining = self.plan.quota(self.weight_version) - owed
        limit = math.ceil(max(remaining, 0) * self.plan.over_sampling)
        return limit - len(self._in_flight)

    async def run(self) -> None:
        """Produce until stop(); raises if a group task fails unexpectedly."""
        log.info(
            "%s: producing (share %d/step, staleness %d)",
            self.worker_id,
            self.plan.share,
            self.plan.max_staleness,
        )
        drops_base, _ = await asyncio.to_thread(self._trainer_view)
        checked = self.weight_version
        while not self._stopping:
            if self.weight_version != checked:  # once per update: the trainer took a batch
                checked = self.weight_version
                drops, self.trainer_version = await asyncio.to_thread(self._trainer_view)
                self._abort_doomed(max(self.trainer_version, self.weight_version))
                self._credit_stale(drops - drops_base)
            room = min(self._room(), self.plan.prompts_per_lease)
            self.stats.set_quota_bound(room <= 0)
            leases = await asyncio.to_thread(self._lease, room) if room > 0 else []
            for lease in leases:
                task = asyncio.create_task(self._produce(lease), name=lease.lease_id)
                self._in_flight[task] = self.weight_version
                self.stats.set_in_flight(len(self._in_flight))
                self.stats.set_busy(True)
                task.add_done_callback(self._finished)
            if not leases:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.05 if room > 0 else 1.0)
                except TimeoutError:
                    pass
        await self._drain()

    def _trainer_view(self) -> tuple[int, int]:
        """The groups the trainer has dropped as stale so far, and its policy version (the
        buffer's counters; the trainer is ahead of this worker while an update travels)."""
        return self.store.drops_and_version()

    def _credit_stale(self, drops: int) -> None:
        """Owe again this worker's part of the groups the trainer dropped as stale. They
        were counted as pushed, yet nobody trained them: without this each drop would shrink
        for good the window this worker may run ahead (partial rollouts on a long tail drop
        a few groups a step, and the window shrank to under half its size in 30 steps)."""
        per_step = self.plan.groups_per_step or self.plan.share
        self.stats.groups_stale_credit = max(
            self.stats.groups_stale_credit, drops * self.plan.share // per_step
        )

    def _abort_doomed(self, trainer_version: int) -> None:
        """Cancel the groups the trainer could only drop: leased under version v, every
        token is at least v, and the trainer (now at `trainer_version`, never going back)
        drops a group whose oldest token is more than max_staleness behind. Their slots and
        their place in the quota go to fresh prompts now instead of after the tail finished;
        the prompt returns to the queue (`_produce`). A group admitted only after a later
        update may be cut one version early: it was leased under v but started under v + 1."""
        limit = trainer_version - self.plan.max_staleness
        for task, version in list(self._in_flight.items()):
            name = task.get_name()
            if version < limit and name in self._generating and name not in self._doomed:
                self._doomed.add(name)
                self.stats.groups_stale_aborted += 1
                task.cancel()

    def _lease(self, k: int) -> list[Any]:
        """Up to k prompts; the lease script requeues expired leases first, in the same round
        trip (a separate requeue_expired call cost one more per lease)."""
        return self.store.lease_prompts(self.worker_id, k)

    def _finished(self, task: asyncio.Task) -> None:
        self._in_flight.pop(task, None)
        self.stats.set_in_flight(len(self._in_flight))
        if not self._in_flight:
            self.stats.set_busy(False)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: a group failed: %r", self.worker_id, task.exception())
            self._failure = task.exception()
            self._stopping = True

    async def _produce(self, lease: Any) -> None:
        started = time.monotonic()
        name = asyncio.current_task().get_name()
        self._generating.add(name)
        try:
            episodes = await self.generate_group(lease.row)
        except asyncio.CancelledError:
            if name not in self._doomed:
                raise  # stop() or a caller: not ours to swallow
            await asyncio.to_thread(self.store.release_lease, lease.lease_id, False)
            return
        finally:
            self._generating.discard(name)
            self._doomed.discard(name)
        await self.score_group(episodes)
        self._count(episodes)
        if self.plan.dynamic_sampling and all_rewards_equal(episodes):
            self.stats.groups_filtered += 1
            await asyncio.to_thread(self.store.release_lease, lease.lease_id, True)
            return
        if self._stopping:  # nobody will train on it: give the prompt back
            return await self._drop(lease)
        group = EpisodeGroup(
            prompt_id=lease.prompt_id,
            episodes=episodes,
            metadata={
                "worker": self.worker_id,
                "lease_id": lease.lease_id,
                "epoch": lease.epoch,  # the trainer's record of what it trained names it
                "seconds": round(time.monotonic() - started, 4),
            },
        )
        try:
            entry = await asyncio.to_thread(
                self.store.put_group, group, lease_id=lease.lease_id, cancel=self._cancel_puts
            )
        except PutCancelledError:
            return await self._drop(lease)
        if entry is None:
            self.stats.groups_refused += 1
        else:
            self.stats.groups_pushed += 1

    def _count(self, episodes: list[Episode]) -> None:
        self.stats.episodes += len(episodes)
        self.stats.episode_errors += sum(e.is_error for e in episodes)
        self.stats.generated_tokens += sum(e.num_trainable for e in episodes)
        self.stats.reward_sum += sum(e.reward for e in episodes)

    async def _drop(self, lease: Any) -> None:
        """Give up a finished group at stop: its prompt returns to the queue, counted."""
        self.stats.groups_dropped += 1
        await asyncio.to_thread(self.store.release_lease, lease.lease_id, False)

    def stop(self) -> None:
        """Stop producing: no new leases, waits for buffer room end, generation is aborted
        (in `_drain`); groups not pushed by then are dropped and their prompts requeued."""
        self._stopping = True
        self._cancel_puts.set()
        self._wake.set()

    async def _drain(self, timeout_s: float = 30.0) -> None:
        """Abort generation until every group task ended (a multi-turn episode may start a
        new turn after an abort, so abort again); cancel what is left after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await self.engine.abort(None)
            await asyncio.wait(set(self._in_flight), timeout=0.5)
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            log.warning("%s: %d group task(s) cancelled at stop", self.worker_id,
                        len(self._in_flight))  # fmt: skip
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        failure = getattr(self, "_failure", None)
        if failure is not None:
            raise failure


def sampling_from_config(
    rollout_cfg: Any,
    stop_token_ids: list[int],
    *,
    seed: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
) -> SamplingParams:
    """SamplingParams for training rollouts (or eval, with overrides) from RolloutConfig."""
    return SamplingParams(
        max_new_tokens=max_new_tokens or rollout_cfg.max_new_tokens,
        temperature=rollout_cfg.temperature if temperature is None else temperature,
        top_p=rollout_cfg.top_p,
        top_k=rollout_cfg.top_k,
        stop_token_ids=list(stop_token_ids),
        sampling_seed=seed,
    )
