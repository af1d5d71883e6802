"""Score episodes with a weighted sum of reward plugins, each call under a timeout.

`build_reward_fn(specs, timeout_s)` resolves every spec once (at job start) and returns a
`RewardFn`. `await reward_fn.score_group(episodes)` fills, in place:

* ``episode.rewards[name]``: each plugin's scalar (before weighting), and for dict results
  each component as ``episode.rewards[f"{name}/{key}"]``;
* ``episode.reward``: the sum over plugins of ``weight * scalar``.

Failure isolation: when a plugin raises, returns something invalid or exceeds `timeout_s` for
an episode, THAT episode is marked error (`Episode.mark_error`, message naming the plugin), gets
``reward = 0.0`` and empty ``rewards``; the other episodes are scored normally and nothing is
raised. A batch plugin that fails fails every episode of its call. Episodes that arrive
already marked error (a failed generation or environment) are not scored; their reward is 0.

Async plugins run on the event loop and a timed-out one is cancelled. Each sync plugin call
runs in its own daemon thread, in a lane of that plugin only (`rewards.isolation.SyncLane`, at
most `max_workers` calls of one plugin at once): a timed-out call is abandoned, so a hung sync
plugin fills only its own lane and never starves the other plugins (it cannot be killed, so
plugins that can hang, such as subprocesses or HTTP, are better async, as the built-in `code`
and `remote_rm` are).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from buffer.episode import Episode
from rewards.isolation import SyncLane
from rewards.protocol import to_scalar
from rewards.registry import ResolvedReward, RewardSpecLike, resolve_reward

logger = logging.getLogger(__name__)

# One plugin's verdict on one episode: (scalar, components) or an error message.
Outcome = tuple[float, Mapping[str, float]] | str


class RewardFn:
    """A weighted sum of resolved rewards with per-call timeouts (see module doc)."""

    def __init__(
        self, rewards: Sequence[ResolvedReward], timeout_s: float, *, max_workers: int = 4
    ) -> None:
        if not rewards:
            raise ValueError("rewards: expected at least one reward plugin, got none")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s: expected a finite number > 0, got {timeout_s}")
        names = [r.name for r in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rewards: each plugin name may appear once, repeated: {duplicates}")
        self.rewards = tuple(rewards)
        self.timeout_s = float(timeout_s)
        self._lanes = {r.name: SyncLane(r.name, max_workers) for r in rewards if not r.is_async}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    async def score_group(self, episodes: Sequence[Episode]) -> None:
        """Score `episodes` in place (reward, rewards; errors marked). Never raises for a plugin."""
        live = [e for e in episodes if not e.is_error]
        for episode in episodes:
            if episode.is_error:
                episode.reward = 0.0
        if not live:
            return
        per_plugin = await asyncio.gather(*(self._run_plugin(r, live) for r in self.rewards))
        for index, episode in enumerate(live):
            self._combine(episode, [outcomes[index] for outcomes in per_plugin])

    async def score(self, episode: Episode) -> None:
        """Score one episode in place."""
        await self.score_group([episode])

    def close(self) -> None:
        """Nothing to release: threads still running a hung sync plugin are daemons, abandoned."""

    def __enter__(self) -> RewardFn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _combine(self, episode: Episode, outcomes: Iterable[Outcome]) -> None:
        errors: list[str] = []
        rewards: dict[str, float] = {}
        total: list[float] = []
        for reward, outcome in zip(self.rewards, outcomes):
            if isinstance(outcome, str):
                errors.append(outcome)
                continue
            scalar, components = outcome
            rewards[reward.name] = scalar
            for key, value in components.items():
                rewards[f"{reward.name}/{key}"] = value
            total.append(reward.weight * scalar)
        if errors:
            episode.mark_error("; ".join(errors))
            episode.reward = 0.0
            episode.rewards = {}
            return
        episode.rewards = rewards
        episode.reward = math.fsum(total)

    async def _run_plugin(self, reward: ResolvedReward, episodes: list[Episode]) -> list[Outcome]:
        if not reward.batched and not reward.is_async:
            return await self._sync_each(reward, episodes)
        if not reward.batched:
            return list(await asyncio.gather(*(self._one(reward, e) for e in episodes)))
        try:
            values = await self._call(reward, list(episodes))
            if not isinstance(values, Sequence) or len(values) != len(episodes):
                got = len(values) if isinstance(values, Sequence) else type(values).__name__
                raise ValueError(f"batch reward returned {got} values for {len(episodes)}")
            return [self._check(reward, v) for v in values]
        except Exception as exc:  # noqa: BLE001 - a plugin failure must not crash the batch
            message = self._describe(reward, exc)
            return [message] * len(episodes)

    async def _sync_each(self, reward: ResolvedReward, episodes: list[Episode]) -> list[Outcome]:
        """A sync plugin on each episode in its lane, every call under `timeout_s` from now
        (as a wait_for per call would be: they all start here), without a task and a timer
        per call on the event loop."""
        lane = self._lanes[reward.name]
        results = lane.submit(reward.fn, episodes)
        try:
            await asyncio.wait(results, timeout=self.timeout_s)
        finally:  # timed out or cancelled: calls not started never start, the rest abandoned
            late = [r for r in results if not r.done()]
            lane.withdraw(late)
            for result in late:
                result.cancel()
        outcomes: list[Outcome | None] = [None] * len(episodes)
        awaited: dict[int, Any] = {}
        for index, result in enumerate(results):
            if result.cancelled():
                outcomes[index] = self._describe(reward, TimeoutError())
            elif (exc := result.exception()) is not None:
                if not isinstance(exc, Exception):
                    raise exc  # as `_one` lets it through: not a plugin failure
                outcomes[index] = self._describe(reward, exc)
            elif inspect.isawaitable(value := result.result()):
                awaited[index] = value  # a plain function that returned a coroutine
            else:
                outcomes[index] = self._check(reward, value)
        if awaited:
            settled = await asyncio.gather(*(self._late(reward, v) for v in awaited.values()))
            for index, outcome in zip(awaited, settled, strict=True):
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value] - every index was filled above

    async def _late(self, reward: ResolvedReward, awaitable: Any) -> Outcome:
        try:
            return self._check(reward, await asyncio.wait_for(awaitable, self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - a plugin failure must not crash the batch
            return self._describe(reward, exc)

    async def _one(self, reward: ResolvedReward, episode: Episode) -> Outcome:
        try:
            return self._check(reward, await self._call(reward, episode))
        except Exception as exc:  # noqa: BLE001 - a plugin failure must not crash the batch
            return self._describe(reward, exc)

    def _check(self, reward: ResolvedReward, value: Any) -> Outcome:
        try:
            return to_scalar(value, reward.main_key, reward.name)
        except ValueError as exc:
            return f"reward {reward.name!r}: {exc}"

    async def _call(self, reward: ResolvedReward, arg: Any) -> Any:
        if reward.is_async:
            result = await asyncio.wait_for(reward.fn(arg), self.timeout_s)
        else:
            lane = self._lanes[reward.name]
            result = await asyncio.wait_for(lane.call(reward.fn, arg), self.timeout_s)
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            result = await asyncio.wait_for(result, self.timeout_s)
        return result

    def _describe(self, reward: ResolvedReward, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            message = f"reward {reward.name!r} timed out after {self.timeout_s:g}s"
            if (lane := self._lanes.get(reward.name)) is not None:
                logger.warning(
                    "%s: %d of its calls still running, abandoned", message, lane.running
                )
                return message
        else:
            message = f"reward {reward.name!r} raised {type(exc).__name__}: {exc}"
        logger.warning("%s", message)
        return message


def build_reward_fn(
    specs: Sequence[RewardSpecLike], timeout_s: float, *, max_workers: int = 4
) -> RewardFn:
    """Resolve and check every spec now (job start) and return their weighted sum.

    Args:
      specs: objects with `name`, `weight`, `args` (RewardSpec or the config's plugin entries).
      timeout_s: per-call timeout of each plugin, in seconds.
      max_workers: concurrent calls of one sync plugin (each in its own thread).
    Raises PluginError (a ValueError) naming the first spec that does not resolve.
    """
    return RewardFn([resolve_reward(s) for s in specs], timeout_s, max_workers=max_workers)
