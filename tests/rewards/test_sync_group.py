"""A plain sync per-episode reward scores a group in one hop of its lane: the same rewards and
errors as episode by episode, one thread for the group, and a hung call fails only its own
episode (the episodes after it are still scored)."""

from __future__ import annotations

import asyncio

import pytest

from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from tests.rewards import group_plugins
from tests.rewards.conftest import episode_with

PLUGINS = "tests.rewards.group_plugins"
TEXTS = ["a", "boom", "abc", "nan", "dict", "", "abcdefg", "xy"]


def _score(specs: list[RewardSpec], texts: list[str], *, one_by_one: bool, timeout_s=5.0):
    episodes = [episode_with(t, label="abc") for t in texts]
    with build_reward_fn(specs, timeout_s) as reward_fn:

        async def run() -> None:
            if one_by_one:  # a group of one takes the per-episode path
                for episode in episodes:
                    await reward_fn.score(episode)
            else:
                await reward_fn.score_group(episodes)

        asyncio.run(run())
    return episodes


@pytest.mark.parametrize("plugin", ["recorded", "returns_coroutine"])
def test_group_call_gives_the_same_records_as_one_by_one(plugin: str) -> None:
    specs = [RewardSpec(f"{PLUGINS}:{plugin}", weight=0.5), RewardSpec("exact", weight=2.0)]
    texts = TEXTS if plugin == "recorded" else ["a", "abc", "", "xy"]
    group_plugins.CALLS.clear()
    grouped = _score(specs, texts, one_by_one=False)
    threads = {ident for _, ident in group_plugins.CALLS}
    alone = _score(specs, texts, one_by_one=True)
    for g, a in zip(grouped, alone):
        assert (g.reward, g.rewards, g.finish_reason) == (a.reward, a.rewards, a.finish_reason)
        assert g.metadata.get("error") == a.metadata.get("error")
    if plugin == "recorded":
        assert [text for text, _ in group_plugins.CALLS[: len(texts)]] == texts  # in order
        assert len(threads) == 1  # the whole group in one hop
        assert [e.is_error for e in grouped] == [t in ("boom", "nan") for t in texts]
        assert "RuntimeError: exploded on purpose" in grouped[1].metadata["error"]
        assert grouped[4].rewards[f"{PLUGINS}:recorded/b"] == 2.0
        assert grouped[6].reward == 0.5 * 7 + 2.0 * 0.0 and grouped[2].reward == 0.5 * 3 + 2.0


def test_a_hung_call_times_out_its_episode_and_the_rest_are_scored() -> None:
    group_plugins.CALLS.clear()
    group_plugins.RELEASE.clear()
    texts = ["a", "hang", "abc", "xy"]
    try:
        # 3 s: the instant calls finish within it even on a busy CPU; "hang" never does
        episodes = _score([RewardSpec(f"{PLUGINS}:recorded")], texts, one_by_one=False,
                          timeout_s=3.0)  # fmt: skip
    finally:
        group_plugins.RELEASE.set()
    assert [e.is_error for e in episodes] == [False, True, False, False]
    assert episodes[1].metadata["error"] == f"reward '{PLUGINS}:recorded' timed out after 3s"
    assert [e.reward for e in episodes] == [1.0, 0.0, 3.0, 2.0]
    called = [text for text, _ in group_plugins.CALLS]
    assert sorted(called) == sorted(texts)  # each episode called exactly once
