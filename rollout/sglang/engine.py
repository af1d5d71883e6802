"""`SGLangEngine`: the rollout Engine protocol (rollout/types.py) over SGLang 0.5.23 servers.

Generation goes through `sglang-router` when one is in front of the workers, else straight to
the workers (requests spread round-robin). Everything the router does not forward -- weight
updates, pause/continue, abort, cache flushes, versions -- goes to every worker directly.

Health with restart: `check_and_restart()` finds workers whose /health fails, takes them out
of the router, restarts their server process, re-sends the newest weights (the retained last
update, or the newest disk version) and only then lets them serve again. Versions are our
integer versions sent to SGLang as strings ("default" before any update reads as 0).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from models.weight_update import WeightUpdate
from rollout.http_client import EngineHTTPError, SGLangClient, version_to_int
from rollout.routing_wire import RoutingLayout
from rollout.sglang.router import SGLangRouter
from rollout.sglang.weight_sync import DiskSync, WeightSync, WeightSyncError, push_update
from rollout.sglang.worker import Worker
from rollout.types import PAUSE_MODES, GenerateOutput, GenerateRequest

if TYPE_CHECKING:
    from configs import JobConfig

logger = logging.getLogger(__name__)


class SGLangEngine:
    """Engine over one or more SGLang workers, optionally behind an sglang-router."""

    def __init__(
        self,
        workers: Sequence[Worker],
        *,
        weight_sync: WeightSync,
        router: SGLangRouter | None = None,
        request_timeout: float = 120.0,
        retain_last_update: bool = True,
    ) -> None:
        if not workers:
            raise ValueError("SGLangEngine: expected at least one worker")
        self.workers = list(workers)
        self.sync = weight_sync
        self.router = router
        self.retain_last_update = retain_last_update
        self.last_sync_seconds: float | None = None
        self._router_client = (
            SGLangClient(router.url, timeout=request_timeout, api_key=router.api_key)
            if router is not None
            else None
        )
        self._ready = {w.url: asyncio.Event() for w in self.workers}
        for event in self._ready.values():
            event.set()
        self._turn = itertools.count()
        self._update_lock = asyncio.Lock()
        self._last_update: WeightUpdate | None = None
        self._paused: str | None = None

    def set_routing(self, layout: RoutingLayout) -> None:
        """R3: map the servers' routed experts with this MoE layout (rollout/routing_wire.py)."""
        for w in self.workers:
            w.client.routing = layout
        if self._router_client is not None:
            self._router_client.routing = layout

    @property
    def paused_mode(self) -> str | None:
        """The mode of the last pause() not yet resumed, else None."""
        return self._paused

    # ---- generation --------------------------------------------------------------------------

    async def _pick(self) -> Worker:
        for _ in range(len(self.workers)):
            worker = self.workers[next(self._turn) % len(self.workers)]
            if self._ready[worker.url].is_set():
                return worker
        worker = self.workers[next(self._turn) % len(self.workers)]
        await self._ready[worker.url].wait()
        return worker

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Outputs in request order; the n samples of a request are consecutive."""
        if self._router_client is not None:
            return await self._router_client.generate(requests)

        async def one(req: GenerateRequest) -> list[GenerateOutput]:
            worker = await self._pick()
            return await worker.client.generate([req])

        groups = await asyncio.gather(*(one(r) for r in requests))
        return [out for group in groups for out in group]

    # ---- weights -----------------------------------------------------------------------------

    async def update_weights(self, update: WeightUpdate) -> None:
        """Push `update` to every ready worker through the configured path, then flush the
        prefix cache (skipped, with a warning, while requests still run: e.g. in-place pause)."""
        async with self._update_lock:
            live = [w for w in self.workers if self._ready[w.url].is_set()]
            self.last_sync_seconds = await push_update(self.sync, live, update)
            if self.retain_last_update:
                self._last_update = update
            await self._flush(live, quiet=True)
        logger.info(
            "sglang: weights v%d (%d B) via %s to %d worker(s) in %.3f s",
            update.version,
            update.nbytes,
            self.sync.name,
            len(live),
            self.last_sync_seconds,
        )

    async def _flush(self, workers: list[Worker], *, quiet: bool) -> None:
        for w in workers:
            try:
                await w.client.flush_cache()
            except EngineHTTPError as err:
                if not quiet or err.status != 400:
                    raise
                logger.warning("%s: cache not flushed after update (requests running)", w.url)

    async def weight_version(self) -> int:
        """The oldest version any worker serves."""
        versions = await asyncio.gather(*(w.client.weight_version() for w in self.workers))
        return min(version_to_int(v) for v in versions)

    # ---- flow control ------------------------------------------------------------------------

    async def pause(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode: expected one of {PAUSE_MODES}, got {mode!r}")
        await asyncio.gather(*(w.client.pause_generation(mode) for w in self.workers))
        self._paused = mode

    async def resume(self) -> None:
        await asyncio.gather(*(w.client.continue_generation() for w in self.workers))
        self._paused = None

    async def abort(self, rids: list[str] | None = None) -> None:
        """Abort the given request ids (on every worker: any may hold them), or all."""
        if rids is None:
            calls = [w.client.abort_request(abort_all=True) for w in self.workers]
        else:
            calls = [w.client.abort_request(rid=r) for w in self.workers for r in rids]
        await asyncio.gather(*calls)

    async def flush_cache(self) -> None:
        await self._flush(self.workers, quiet=False)

    # ---- health ------------------------------------------------------------------------------

    async def health(self) -> bool:
        checks = [w.client.health() for w in self.workers]
        if self._router_client is not None:
            checks.append(self._router_answers())
        return all(await asyncio.gather(*checks))

    async def _router_answers(self) -> bool:
        return self.router is not None and await asyncio.to_thread(self.router.answers)

    async def check_and_restart(self) -> list[str]:
        """Restart every launched worker whose /health fails; returns their URLs.

        A restarted worker is out of the router until its weights are re-sent, and direct
        generation waits for it, so it never serves stale weights.
        """
        states = await asyncio.gather(*(w.client.health() for w in self.workers))
        restarted = []
        for worker, healthy in zip(self.workers, states):
            if healthy:
                continue
            if worker.server is None:
                raise RuntimeError(f"{worker.url}: unhealthy, not launched by us: cannot restart")
            await self._restart(worker)
            restarted.append(worker.url)
        return restarted

    async def _restart(self, worker: Worker) -> None:
        self._ready[worker.url].clear()
        logger.warning("%s: unhealthy; restarting", worker.url)
        if self.router is not None:
            await asyncio.to_thread(self.router.remove_worker, worker.url)
        others = [w for w in self.workers if w is not worker]
        await self.sync.forget(worker, others)
        server = worker.server
        if server is None:
            raise RuntimeError(f"{worker.url}: not launched by us; cannot restart")
        await asyncio.to_thread(server.restart)
        async with self._update_lock:
            await self._resync(worker)
        if self.router is not None:
            key = server.args.api_key  # the worker's own key, as at launch
            await asyncio.to_thread(self.router.add_worker, worker.url, api_key=key)
        self._ready[worker.url].set()
        logger.warning("%s: restarted and re-synced", worker.url)

    async def _resync(self, worker: Worker) -> None:
        if self._last_update is not None:
            await push_update(self.sync, [worker], self._last_update)
            return
        if isinstance(self.sync, DiskSync) and self.sync.last_path is not None:
            version = self.sync.last_path.name.removeprefix("v")
            await worker.client.update_weights_from_disk(
                str(self.sync.last_path), weight_version=version
            )
            return
        others = [w for w in self.workers if w is not worker]
        versions = await asyncio.gather(*(w.client.weight_version() for w in others))
        if any(version_to_int(v) > 0 for v in versions):
            raise WeightSyncError(
                f"{worker.url}: restarted, but no retained update or disk version to re-send"
            )

    # ---- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Destroy weight-update groups and close the HTTP clients; servers keep running."""
        await self.sync.close(self.workers)
        if self._router_client is not None:
            await self._router_client.close()
        for w in self.workers:
            await w.client.close()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the router and every server this engine launched (blocking, like the embedded
        engine's shutdown). Weight-update groups and HTTP clients die with the servers; call
        `await close()` first for a tidy teardown while the event loop still runs."""
        if self.router is not None:
            self.router.stop(timeout=timeout)
        for w in self.workers:
            if w.server is not None:
                w.server.stop(timeout=timeout)


def launch_sglang_engine(
    job: JobConfig, model_dir: str | Path, *, name: str, tokenizer_dir: str | Path | None = None
) -> SGLangEngine:
    """The `rollout.engine: sglang` entry of rollout.worker.ENGINES (see rollout.sglang.launch)."""
    from rollout.sglang.launch import launch_sglang_engine as launch

    return launch(job, model_dir, name=name, tokenizer_dir=tokenizer_dir)
