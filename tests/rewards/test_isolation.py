"""A hung sync reward plugin must not starve the others (issue 18, item 4)."""

from __future__ import annotations

import asyncio

from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from tests.rewards import hang_plugins
from tests.rewards.conftest import episode_with

HANG = "tests.rewards.hang_plugins:hangs_until_released"


def test_hung_sync_plugin_does_not_starve_arithmetic() -> None:
    episodes = [episode_with("The answer is 4", label="4") for _ in range(8)]
    specs = [RewardSpec(HANG), RewardSpec("arithmetic")]
    hang_plugins.RELEASE.clear()  # an earlier test (tests/bad_inputs) may have left it set
    try:
        # timeout generous for a loaded machine: arithmetic takes microseconds; with the old
        # shared 4-thread pool the 8 hung calls held every thread and arithmetic timed out too
        with build_reward_fn(specs, timeout_s=5.0, max_workers=2) as reward_fn:
            asyncio.run(reward_fn.score_group(episodes))
            lane = reward_fn._lanes[HANG]
            assert lane.running == 2  # the hung plugin holds only its own lane
    finally:
        hang_plugins.RELEASE.set()
    for episode in episodes:
        message = episode.metadata.get("error", "")
        assert f"reward {HANG!r} timed out" in message
        assert "'arithmetic'" not in message  # arithmetic answered every call


def test_lane_reuses_its_thread_and_lets_it_go_when_idle(monkeypatch) -> None:
    """Calls in turn run on one thread of the lane (no thread start per call); concurrent
    calls get threads of their own up to the limit; an idle thread exits after IDLE_S."""
    import threading
    import time

    from rewards import isolation

    monkeypatch.setattr(isolation, "IDLE_S", 60.0)  # no idle exit however slow the machine
    lane = isolation.SyncLane("reuse", limit=2)
    gate = threading.Barrier(2, timeout=10)

    def both_inside(_: object) -> int:
        gate.wait()  # only returns once two calls run at the same time
        return threading.get_ident()

    async def scenario() -> tuple[list[int], list[int]]:
        in_turn = [await lane.call(lambda _: threading.get_ident(), None) for _ in range(5)]
        together = await asyncio.gather(lane.call(both_inside, None), lane.call(both_inside, None))
        return in_turn, list(together)

    in_turn, together = asyncio.run(scenario())
    assert len(set(in_turn)) == 1
    assert len(set(together)) == 2
    assert lane.running == 0

    monkeypatch.setattr(isolation, "IDLE_S", 0.2)
    brief = isolation.SyncLane("brief", limit=1)
    assert asyncio.run(brief.call(lambda x: x + 1, 1)) == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        t.name == "reward-brief" for t in threading.enumerate()
    ):
        time.sleep(0.05)
    assert not any(t.name == "reward-brief" for t in threading.enumerate())


def test_lane_backlog_keeps_the_limit_and_skips_withdrawn_calls() -> None:
    """Calls past the limit wait in the backlog and run on the lane's own threads as they
    free (no thread beyond the limit); a call withdrawn before it started never runs."""
    import threading
    import time

    from rewards.isolation import SyncLane

    lane = SyncLane("burst", limit=2)
    gate = threading.Event()
    ran: list[tuple[int, int]] = []

    def held(x: int) -> int:
        ran.append((x, threading.get_ident()))
        gate.wait(30)
        return x * 10

    async def scenario() -> list[int]:
        results = lane.submit(held, list(range(6)))
        deadline = time.monotonic() + 30
        while len(ran) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert lane.running == 2 and len(ran) == 2  # the other four wait for a slot
        lane.withdraw(results[5:])
        results[5].cancel()
        gate.set()
        return list(await asyncio.gather(*results[:5]))

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40]
    assert sorted(x for x, _ in ran) == [0, 1, 2, 3, 4]  # 5 was withdrawn before it started
    assert len({thread for _, thread in ran}) == 2
    assert lane.running == 0


def test_lane_outcomes_wake_the_loop_once_per_batch() -> None:
    """Outcomes posted while a flush is pending ride along with it: a burst of calls settles
    every future (values and errors, in place) with fewer cross-thread wake-ups than calls."""
    import threading

    from rewards.isolation import SyncLane

    lane = SyncLane("batched", limit=4)
    gate = threading.Event()

    def score(x: int) -> int:
        gate.wait(30)
        if x == 3:
            raise ValueError("three")
        return x * 2

    async def scenario() -> tuple[list[object], int]:
        loop = asyncio.get_running_loop()
        wakeups = [0]
        original = loop.call_soon_threadsafe

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            wakeups[0] += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        results = lane.submit(score, list(range(16)))
        gate.set()
        outcomes = await asyncio.gather(*results, return_exceptions=True)
        return outcomes, wakeups[0]

    outcomes, wakeups = asyncio.run(scenario())
    assert [o if not isinstance(o, Exception) else str(o) for o in outcomes] == [
        *(0, 2, 4, "three"),
        *(2 * x for x in range(4, 16)),
    ]
    assert 1 <= wakeups < 16
