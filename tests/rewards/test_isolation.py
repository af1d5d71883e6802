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
