"""Bad plugins (issue 18, items 4 and 8): refused at job start (resolution) with PluginError
naming the plugin, or, when they misbehave per call, an error episode naming the plugin while
the others score."""

from __future__ import annotations

import asyncio

import pytest

from envs.calculator import CalculatorEnv
from envs.registry import resolve_env
from envs.tasks import make_rows, tokenizer_corpus
from models.tokenizer import build_toy_tokenizer
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec, resolve_reward
from rewards.resolver import PluginError
from rollout.multiturn import run_episode
from rollout.types import SamplingParams
from tests.rewards import hang_plugins
from tests.rewards.conftest import episode_with
from tests.rollout.test_multiturn import ScriptedEngine, model_turn, tool_call_text

SAMPLE = "tests.rewards.sample_plugins"

# (case id, spec, text the PluginError must contain)
RESOLVE_CASES = [
    ("unknown-name", RewardSpec("aritmetic"), "unknown reward 'aritmetic'. Valid built-in names"),
    ("no-colon-module", RewardSpec("nope.module:fn"), "cannot import 'nope.module'"),
    ("missing-attr", RewardSpec(f"{SAMPLE}:no_such"), "has no attribute 'no_such'"),
    ("empty-attr", RewardSpec("tests.rewards.sample_plugins:"), "expected the form"),
    ("not-callable", RewardSpec(f"{SAMPLE}:NOT_CALLABLE"), "resolved to a int"),
    ("two-args", RewardSpec(f"{SAMPLE}:two_arguments"), "exactly one positional argument"),
    ("bad-fn-args", RewardSpec("arithmetic", args={"scale": 2}), "does not accept args"),
    ("bad-class-args", RewardSpec(f"{SAMPLE}:Threshold", args={"x": 1}), "cannot build it"),
    ("inf-weight", RewardSpec("arithmetic", weight=float("inf")), "weight must be finite"),
    ("nan-weight", RewardSpec("arithmetic", weight=float("nan")), "weight must be finite"),
]


@pytest.mark.parametrize(
    "spec,needle", [c[1:] for c in RESOLVE_CASES], ids=[c[0] for c in RESOLVE_CASES]
)
def test_reward_refused_at_resolution(spec, needle):
    with pytest.raises(PluginError) as err:
        resolve_reward(spec)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "name,args,needle",
    [
        ("calculater", {}, "unknown env 'calculater'"),
        ("envs.nowhere:Env", {}, "cannot import 'envs.nowhere'"),
        ("rewards.registry:REWARD_GROUP", {}, "not a factory"),
        ("calculator", {"bogus_arg": 1}, "bogus_arg"),
    ],
    ids=["env-unknown", "env-bad-import", "env-not-factory", "env-bad-args"],
)
def test_env_refused_at_resolution(name, args, needle):
    with pytest.raises(PluginError) as err:
        resolve_env(name, args)
    assert needle in str(err.value)


def test_duplicate_and_empty_reward_lists_are_refused():
    with pytest.raises(ValueError, match="each plugin name may appear once"):
        build_reward_fn([RewardSpec("arithmetic"), RewardSpec("arithmetic")], 5.0)
    with pytest.raises(ValueError, match="expected at least one reward plugin"):
        build_reward_fn([], 5.0)
    with pytest.raises(ValueError, match="timeout_s: expected a finite number > 0"):
        build_reward_fn([RewardSpec("arithmetic")], float("inf"))


# (case id, plugin, episode metadata, text the episode's error must contain)
CALL_CASES = [
    ("returns-nan", f"{SAMPLE}:returns_nan", {}, "expected a finite float"),
    ("raises", f"{SAMPLE}:fails_on_boom", {"response_text": "boom"}, "RuntimeError"),
    ("list-label", "arithmetic", {"label": [4, 5]}, "metadata['label'] = '[4, 5]' is not a"),
    ("no-label", "arithmetic", {}, "metadata['label'] is missing"),
    ("countdown-no-numbers", "countdown", {"label": "4"}, "metadata['numbers']"),
    ("hangs", "tests.rewards.hang_plugins:hangs_until_released", {"label": "4"}, "timed out"),
]


@pytest.mark.parametrize(
    "plugin,metadata,needle", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES]
)
def test_misbehaving_plugin_marks_the_episode_error(plugin, metadata, needle):
    text = metadata.pop("response_text", "The answer is 4")
    bad = episode_with(text, **metadata)
    hang_plugins.RELEASE.clear()
    try:
        with build_reward_fn([RewardSpec(plugin)], timeout_s=5.0) as reward_fn:
            asyncio.run(reward_fn.score_group([bad]))
    finally:
        hang_plugins.RELEASE.set()
    assert bad.is_error and bad.reward == 0.0 and bad.rewards == {}
    assert repr(plugin) in bad.metadata["error"] and needle in bad.metadata["error"]


class _HangingCalculator(CalculatorEnv):
    """A sync env whose step is stuck (30 s cap so a regression fails instead of hanging)."""

    def step(self, assistant_text: str):
        hang_plugins.RELEASE.wait(timeout=30)
        return super().step(assistant_text)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    return build_toy_tokenizer(
        tmp_path_factory.mktemp("tok"), tokenizer_corpus(n_per_task=50, seed=0)
    )


def test_hung_sync_env_step_times_out_as_an_error_episode(small_tokenizer):
    row = make_rows("calculator", 1, seed=0)[0]
    call = model_turn(
        small_tokenizer, tool_call_text(row["metadata"]["expression"]), "<|observation|>", 0, 0
    )
    sampling = SamplingParams(max_new_tokens=64, temperature=1.0)
    hang_plugins.RELEASE.clear()
    try:
        episode = asyncio.run(
            run_episode(
                ScriptedEngine([call]),
                small_tokenizer,
                _HangingCalculator(),
                row,
                sampling,
                max_turns=4,
                max_total_tokens=2048,
                step_timeout_s=1.0,
            )
        )
    finally:
        hang_plugins.RELEASE.set()
    assert episode.is_error
    assert episode.metadata["error"] == "env _HangingCalculator.step timed out after 1s"
