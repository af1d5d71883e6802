"""RewardFn: weighted sums, dict results, batch plugins, per-call timeouts, error isolation."""

from __future__ import annotations

import asyncio

import pytest

from buffer.episode import FinishReason
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from tests.rewards.conftest import episode_with

PLUGINS = "tests.rewards.sample_plugins"


def score(specs: list[RewardSpec], episodes: list, timeout_s: float = 5.0) -> None:
    with build_reward_fn(specs, timeout_s) as reward_fn:
        asyncio.run(reward_fn.score_group(episodes))


def test_weighted_sum_of_sync_async_and_class_plugins() -> None:
    episodes = [episode_with("yes!"), episode_with("no")]
    specs = [
        RewardSpec(f"{PLUGINS}:length_reward", weight=0.5),
        RewardSpec(f"{PLUGINS}:async_contains", weight=2.0, args={"needle": "yes"}),
        RewardSpec(f"{PLUGINS}:Threshold", weight=-1.0, args={"minimum": 3}),
    ]
    score(specs, episodes)
    first, second = episodes
    assert first.rewards == {
        f"{PLUGINS}:length_reward": 4.0,
        f"{PLUGINS}:async_contains": 1.0,
        f"{PLUGINS}:Threshold": 1.0,
    }
    assert first.reward == pytest.approx(0.5 * 4 + 2.0 * 1 - 1.0 * 1)
    assert second.reward == pytest.approx(0.5 * 2 + 0 - 0)
    assert not first.is_error and not second.is_error


def test_dict_results_main_key_and_sum() -> None:
    episode = episode_with("42")
    score(
        [
            RewardSpec(f"{PLUGINS}:with_components", weight=3.0),
            RewardSpec(f"{PLUGINS}:summed_components", weight=1.0),
        ],
        [episode],
    )
    main, summed = f"{PLUGINS}:with_components", f"{PLUGINS}:summed_components"
    assert episode.rewards[main] == 1.0  # the main key, not accuracy + length
    assert episode.rewards[f"{main}/length"] == 0.5
    assert episode.rewards[summed] == 3.5 and episode.rewards[f"{summed}/b"] == 2.5
    assert episode.reward == pytest.approx(3.0 * 1.0 + 3.5)


def test_batch_plugin_gets_the_live_episodes_in_order() -> None:
    episodes = [episode_with("a"), episode_with("b"), episode_with("c")]
    episodes[1].mark_error("generation failed")
    score([RewardSpec(f"{PLUGINS}:batch_index")], episodes)
    assert [e.reward for e in episodes] == [0.0, 0.0, 1.0]  # the failed one was not sent
    assert episodes[1].metadata["error"] == "generation failed"


def test_a_raising_plugin_fails_only_its_episode() -> None:
    episodes = [episode_with("fine"), episode_with("boom"), episode_with("ok")]
    score(
        [RewardSpec(f"{PLUGINS}:fails_on_boom"), RewardSpec(f"{PLUGINS}:length_reward")],
        episodes,
    )
    assert [e.finish_reason for e in episodes] == [
        FinishReason.STOP,
        FinishReason.ERROR,
        FinishReason.STOP,
    ]
    failed = episodes[1]
    assert failed.reward == 0.0 and failed.rewards == {}
    assert "fails_on_boom" in failed.metadata["error"]
    assert "RuntimeError: exploded on purpose" in failed.metadata["error"]
    assert episodes[0].reward == 1.0 + 4.0 and episodes[2].reward == 1.0 + 2.0


@pytest.mark.parametrize("plugin", ["sleeps_sync", "sleeps_async"])
def test_timeout_marks_that_episode_error(plugin: str) -> None:
    episodes = [episode_with("0"), episode_with("3"), episode_with("0.01")]
    # 1 s: the quick calls (0 and 10 ms) finish within it even on a busy CPU; 3 s never does
    score([RewardSpec(f"{PLUGINS}:{plugin}")], episodes, timeout_s=1.0)
    assert [e.is_error for e in episodes] == [False, True, False]
    assert episodes[1].metadata["error"] == f"reward '{PLUGINS}:{plugin}' timed out after 1s"
    assert episodes[0].reward == 1.0 and episodes[1].reward == 0.0


def test_invalid_values_and_missing_inputs_are_errors() -> None:
    nan, missing = episode_with("x"), episode_with("x")
    del missing.metadata["response_text"]
    score([RewardSpec(f"{PLUGINS}:returns_nan")], [nan])
    assert nan.is_error and "expected a finite float" in nan.metadata["error"]
    score([RewardSpec("exact")], [missing])
    assert missing.is_error
    assert "metadata['response_text'] is missing" in missing.metadata["error"]


def test_failing_batch_plugin_fails_all_of_its_episodes() -> None:
    episodes = [episode_with("a"), episode_with("b")]
    for e in episodes:
        del e.metadata["response_text"]
    score([RewardSpec("remote_rm", args={"url": "http://127.0.0.1:9"})], episodes)
    assert all(e.is_error and "remote_rm" in e.metadata["error"] for e in episodes)


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="at least one reward"):
        build_reward_fn([], 1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        build_reward_fn([RewardSpec("exact")], 0)
    with pytest.raises(ValueError, match="repeated: \\['exact'\\]"):
        build_reward_fn([RewardSpec("exact"), RewardSpec("exact", weight=2)], 1.0)
