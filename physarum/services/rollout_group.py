"""Rollout workers, seen from the driver: the handle on every RolloutActor (rollout_actor.py).

The group pushes weights to every worker, splits eval rows across them, and watches them: a
worker that dies is restarted and receives the current weights before it produces again
(its leased prompts return to the queue when their leases expire).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from configs import JobConfig
from physarum.cluster import actor_options
from physarum.services.rollout_actor import RolloutActor

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 60.0  # stop aborts generation at once; this only bounds a stuck worker


class EngineStalledError(TimeoutError):
    """A rollout worker did not answer within the configured timeout."""


class RolloutGroup:
    """Handle on every rollout worker, with restart on death."""

    def __init__(
        self,
        job: JobConfig,
        model_dir: Path,
        tokenizer_dir: Path,
        *,
        store_url: str | None,
        placement: Any = None,
    ) -> None:
        self.job = job
        self.args = (str(model_dir), str(tokenizer_dir))
        self.store_url = store_url
        self.placement = placement
        self.options = actor_options(
            job.cluster.rollout_cpus, job.cluster.rollout_gpus, threads=job.rollout.threads
        )
        self.ids = [f"rollout-{i}" for i in range(job.rollout.num_workers)]
        self.actors = {wid: self._spawn(wid) for wid in self.ids}
        self.latest_update: ray.ObjectRef | None = None
        self.latest_version = 0
        self.earlier: tuple[ray.ObjectRef | None, int] = (None, 0)  # the update before it
        self.runs: dict[str, ray.ObjectRef] = {}
        self.starting: dict[str, tuple[Any, ray.ObjectRef]] = {}  # restarts not yet ready
        self.restarts = 0
        self.producing = False  # between start() and stop(): a replacement joins production
        log.info("rollout: starting %d %s worker(s)", len(self.ids), job.rollout.engine)

    def _spawn(self, worker_id: str) -> Any:
        strategy = self.placement.bundle(worker_id) if self.placement else {}
        return RolloutActor.options(**self.options, **strategy).remote(
            self.job, *self.args, worker_id, self.store_url
        )

    @property
    def share(self) -> int:
        """Groups per version each live worker owes: lost workers' part is covered by the
        others until they are back."""
        per_step = self.job.trainer.prompts_per_step
        return -(-per_step // max(1, len(self.actors)))

    def push_weights(self, update_ref: ray.ObjectRef, version: int, *, wait: bool) -> None:
        """Send the update to every worker; they apply it between two decode steps."""
        self.earlier = (self.latest_update, self.latest_version)
        self.latest_update, self.latest_version = update_ref, version
        refs = [a.update_weights.remote(update_ref) for a in self.actors.values()]
        if wait:
            ray.get(refs)

    def start(self) -> None:
        self.producing = True
        for wid, actor in self.actors.items():
            ray.get(actor.start.remote(self.share, self.latest_version))
            self.runs[wid] = actor.run_until_stopped.remote()

    def check(self) -> None:
        """Restart dead workers; re-raise a worker's own failure (a bug is not a crash)."""
        self._finish_restarts()
        if not self.runs:
            return
        done, _ = ray.wait(list(self.runs.values()), timeout=0, num_returns=len(self.runs))
        for wid, ref in list(self.runs.items()):
            if ref not in done:
                continue
            try:
                ray.get(ref)
            except RayActorError:
                self._restart(wid)
                continue
            raise RuntimeError(f"{wid}: production stopped unexpectedly")

    def _restart(self, worker_id: str) -> None:
        """Replace a dead worker without waiting for it: if its node is gone, the new actor
        waits for its bundle to be placed again (the node back, or another with room) while
        the job goes on with the others, who take over its share meanwhile."""
        self.restarts += 1
        log.warning("rollout: %s died; restarting it (restart #%d)", worker_id, self.restarts)
        self.actors.pop(worker_id, None)
        self.runs.pop(worker_id, None)
        actor = self._spawn(worker_id)
        self.starting[worker_id] = (actor, actor.ready.remote())
        self._reshare()

    def _finish_restarts(self) -> None:
        """Bring replacements that are up back into production, current weights first."""
        for worker_id, (actor, ready) in list(self.starting.items()):
            if not ray.wait([ready], timeout=0)[0]:
                continue
            del self.starting[worker_id]
            try:
                ray.get(ready)
            except RayActorError as exc:
                if exc.actor_init_failed:  # its constructor raised: a bug, not a lost node
                    raise
                # placed on a node that died before it ran (the GCS had not noticed yet)
                self._restart(worker_id)
                continue
            update, version = self._ready_update()
            try:
                if update is not None:
                    ray.get(actor.update_weights.remote(update))
                self.actors[worker_id] = actor
                if update is not self.latest_update:  # applied once the export exists
                    actor.update_weights.remote(self.latest_update)
                if not self.producing:  # an eval before start or after stop: weights only
                    log.info("rollout: %s is back at weight version %d", worker_id, version)
                    continue
                ray.get(actor.start.remote(self.share, version))
            except RayActorError:  # lost again while coming back (its node died again)
                self._restart(worker_id)
                continue
            self.runs[worker_id] = actor.run_until_stopped.remote()
            self._reshare()
            log.info("rollout: %s is back at weight version %d", worker_id, version)

    def _ready_update(self) -> tuple[ray.ObjectRef | None, int]:
        """The newest pushed update that a replacement can load now. The latest may still be
        an export queued behind the trainer's step in progress, which waits for episodes: a
        lone replacement waiting for it would wait for itself. The one before it is done (a
        rank runs its calls in order, and that export came before the step in progress)."""
        latest = self.latest_update
        if latest is None or ray.wait([latest], timeout=0)[0]:
            return latest, self.latest_version
        return self.earlier

    def _reshare(self, timeout_s: float = 30.0) -> None:
        """Tell the live workers their share; one that is dead too (or unreachable) is left
        to the next check, which restarts it."""
        refs = [a.set_share.remote(self.share) for a in self.actors.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                pass

    def wait_for_a_worker(self, timeout_s: float) -> None:
        """Block until at least one worker is live (all may be restarting after a node died)."""
        self._wait_for_restarts(
            lambda: bool(self.actors),
            timeout_s,
            lambda: (
                f"rollout: no worker is live after {timeout_s:.0f} s "
                f"({', '.join(self.starting)} waiting for a node to place them on)"
            ),
        )

    def _wait_for_restarts(
        self, done: Callable[[], bool], timeout_s: float, stalled: Callable[[], str]
    ) -> None:
        """Bring restarted workers back until `done()`; EngineStalledError(stalled()) after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise EngineStalledError(stalled())
            time.sleep(0.5)
            self._finish_restarts()

    def where(self) -> list[dict[str, Any]]:
        """placement.json rows of the live workers."""
        return ray.get([a.where.remote() for a in self.actors.values()])

    def evaluate(self, rows: list[dict], **kwargs: Any) -> tuple[dict[str, float], list[dict]]:
        """(merged metrics, every sample) of the rows split across workers. A worker that dies
        during the eval is replaced and its shard runs again on the replacement, once."""
        self.wait_for_a_worker(self.job.rollout.request_timeout_s)
        ids = list(self.actors)
        shards = {wid: rows[i :: len(ids)] for i, wid in enumerate(ids)}
        shards = {wid: shard for wid, shard in shards.items() if shard}
        refs = {wid: self.actors[wid].evaluate.remote(s, **kwargs) for wid, s in shards.items()}
        # one request timeout per wave of max_running prompts, plus one: never a silent hang
        waves = -(-max(len(s) for s in shards.values()) // self.job.rollout.max_running) + 1
        timeout = self.job.rollout.request_timeout_s * waves
        deadline = time.monotonic() + timeout
        results = {}
        try:
            for wid, ref in refs.items():
                try:
                    results[wid] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except RayActorError:
                    results[wid] = self._evaluate_on_replacement(wid, shards[wid], kwargs, timeout)
        except ray.exceptions.GetTimeoutError:
            raise EngineStalledError(
                f"eval of {len(rows)} prompts did not finish within {timeout:.0f} s "
                f"(rollout.request_timeout_s={self.job.rollout.request_timeout_s}): a rollout "
                "worker or its environment stopped answering"
            ) from None
        ordered = [results[wid] for wid in shards]
        metrics = _merge_eval([r.metrics for r in ordered], [len(s) for s in shards.values()])
        return metrics, [sample for r in ordered for sample in r.samples]

    def _evaluate_on_replacement(
        self, worker_id: str, shard: list[dict], kwargs: dict[str, Any], timeout: float
    ) -> Any:
        """`worker_id` died during an eval: restart it (current weights; production only while
        producing) and run its shard there. A second death in the same eval is raised."""
        log.warning(
            "rollout: %s died during an eval; its %d prompts run again", worker_id, len(shard)
        )
        self._restart(worker_id)
        wait_s = self.job.rollout.request_timeout_s
        self._wait_for_restarts(
            lambda: worker_id in self.actors,
            wait_s,
            lambda: (
                f"rollout: {worker_id} died during an eval and its replacement was not up "
                f"within {wait_s:.0f} s"
            ),
        )
        return ray.get(self.actors[worker_id].evaluate.remote(shard, **kwargs), timeout=timeout)

    def generate_rows(self, rows: list[dict], n: int) -> list[list]:
        """Scored samples of every row, the rows split across workers; row order kept."""
        actors = list(self.actors.values())
        shards = [rows[i :: len(actors)] for i in range(len(actors))]
        results = ray.get(
            [a.generate_rows.remote(s, n) for a, s in zip(actors, shards, strict=True)]
        )
        out: list[list] = [[] for _ in rows]
        for offset, groups in enumerate(results):
            for j, group in enumerate(groups):
                out[offset + j * len(actors)] = group
        return out

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        answered = 0
        for ref in [a.stats.remote() for a in self.actors.values()]:
            try:
                snapshot = ray.get(ref, timeout=STOP_TIMEOUT_S)
            except RayActorError:  # died since the last check(), which restarts it next
                continue
            except ray.exceptions.GetTimeoutError:
                log.warning("rollout: a worker's stats did not come within %.0f s; skipped",
                            STOP_TIMEOUT_S)  # fmt: skip
                continue
            answered += 1
            for key, value in snapshot.items():
                merged[key] = merged.get(key, 0.0) + value
        for mean in ("rollout/reward_mean", "rollout/busy_fraction"):
            if mean in merged:
                merged[mean] /= max(1, answered)
        merged["rollout/restarts"] = float(self.restarts)
        return merged

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every worker's production; a worker that does not answer within `timeout_s`
        is killed and named (the eval that follows would otherwise hang on it)."""
        self.producing = False
        for wid, (actor, _) in self.starting.items():  # replacements that never ran
            log.info("rollout: %s was still waiting for a node; not started", wid)
            ray.kill(actor)
        self.starting.clear()
        refs = {wid: a.stop.remote() for wid, a in self.actors.items()}
        silent = _unanswered(refs, timeout_s)
        for wid in silent:
            log.error("rollout: %s did not stop within %.0f s; killing it", wid, timeout_s)
            ray.kill(self.actors[wid])
        if silent:
            raise EngineStalledError(
                f"rollout: {', '.join(silent)} did not stop within {timeout_s:.0f} s"
            )

    def shutdown(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        refs = {wid: a.shutdown.remote() for wid, a in self.actors.items()}
        for wid in _unanswered(refs, timeout_s):
            log.warning("rollout: %s did not shut down within %.0f s", wid, timeout_s)
        for actor in self.actors.values():
            ray.kill(actor)


def _unanswered(refs: dict[str, ray.ObjectRef], timeout_s: float) -> list[str]:
    """Names whose call has not returned within `timeout_s` (all waited on together); the
    failures of those that did return are logged, not raised: this is the way out."""
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for name, ref in refs.items():
        if ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported, the job is ending anyway
                log.warning("rollout: %s failed while stopping: %r", name, exc)
    return [name for name, ref in refs.items() if ref not in ready]


def _merge_eval(results: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """Prompt-weighted mean of per-worker eval metrics (sums for counts and rates)."""
    total = sum(sizes)
    merged: dict[str, float] = {}
    additive = ("eval/prompts", "eval/errors", "eval/gen_tokens_per_s")
    for result, size in zip(results, sizes, strict=True):
        for key, value in result.items():
            weight = 1.0 if key in additive else size / total
            merged[key] = merged.get(key, 0.0) + value * weight
    return merged
