"""Reward resolution: built-in names, import paths, entry points, protocol checks."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from rewards.registry import BUILTIN_REWARDS, RewardSpec, resolve_reward, valid_reward_names
from rewards.resolver import PluginError
from tests.rewards.conftest import episode_with

PLUGINS = "tests.rewards.sample_plugins"


@pytest.mark.parametrize(
    "name, args",
    [
        ("exact", {}),
        ("numeric", {"rel_tol": 0.01}),
        ("math", {}),
        ("format", {"required_tags": ["answer"]}),
        ("code", {"cpu_s": 2}),
        ("remote_rm", {"url": "http://127.0.0.1:9/score"}),
        ("arithmetic", {}),
        ("countdown", {}),
        ("calculator_task", {}),
        ("env", {}),
    ],
)
def test_every_builtin_resolves_and_is_checked(name: str, args: dict) -> None:
    resolved = resolve_reward(RewardSpec(name, weight=0.5, args=args))
    assert resolved.name == name and resolved.weight == 0.5
    assert callable(resolved.fn)
    assert set(BUILTIN_REWARDS) >= {name}


def test_builtin_flags_are_read_once() -> None:
    assert resolve_reward(RewardSpec("remote_rm", args={"url": "http://h"})).batched
    code = resolve_reward(RewardSpec("code"))
    assert code.is_async and code.main_key == "pass_rate" and not code.batched
    assert not resolve_reward(RewardSpec("exact")).is_async


def test_import_path_function_class_and_args() -> None:
    sync = resolve_reward(RewardSpec(f"{PLUGINS}:length_reward"))
    assert sync.fn(episode_with("abcd")) == 4.0 and not sync.is_async

    bound = resolve_reward(RewardSpec(f"{PLUGINS}:async_contains", args={"needle": "zz"}))
    assert bound.is_async
    assert bound.fn.keywords == {"needle": "zz"}

    cls = resolve_reward(RewardSpec(f"{PLUGINS}:Threshold", args={"minimum": 3}))
    assert cls.fn(episode_with("abc")) == 1.0 and cls.fn(episode_with("ab")) == 0.0

    marked = resolve_reward(RewardSpec(f"{PLUGINS}:with_components"))
    assert marked.main_key == "accuracy"
    assert resolve_reward(RewardSpec(f"{PLUGINS}:batch_index")).batched


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(PluginError) as info:
        resolve_reward(RewardSpec("exactt"))
    message = str(info.value)
    assert "unknown reward 'exactt'" in message
    for name in BUILTIN_REWARDS:
        assert name in message
    assert "physarum.rewards" in message and "pkg.module:attr" in message


@pytest.mark.parametrize(
    "name, args, fragment",
    [
        (f"{PLUGINS}:missing", {}, "has no attribute 'missing'"),
        ("tests.rewards.no_such_module:f", {}, "cannot import"),
        (f"{PLUGINS}:NOT_CALLABLE", {}, "expected a function"),
        (f"{PLUGINS}:two_arguments", {}, "exactly one positional argument"),
        (f"{PLUGINS}:length_reward", {"bogus": 1}, "does not accept args ['bogus']"),
        (f"{PLUGINS}:Threshold", {}, "cannot build it with args"),
        ("numeric", {"tolerance": 1}, "does not accept args ['tolerance']"),
        ("format", {"pattern": "("}, "invalid regular expression"),
        ("remote_rm", {"url": "ftp://x"}, "expected an http(s) URL"),
        (":f", {}, "expected the form"),
    ],
)
def test_bad_plugins_fail_at_resolution(name: str, args: dict, fragment: str) -> None:
    with pytest.raises(PluginError) as info:
        resolve_reward(RewardSpec(name, args=args))
    assert fragment in str(info.value)


def test_entry_point_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed distribution (a .dist-info on sys.path) declaring the group."""
    dist = tmp_path / "physarum_test_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: physarum-test-plugins\n")
    (dist / "entry_points.txt").write_text(
        f"[physarum.rewards]\nshout_length = {PLUGINS}:length_reward\n"
        f"broken = {PLUGINS}:does_not_exist\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert {"shout_length", "broken"} <= set(valid_reward_names())
    resolved = resolve_reward(RewardSpec("shout_length"))
    assert resolved.fn(episode_with("hello")) == 5.0
    with pytest.raises(PluginError, match="entry point .* failed to load"):
        resolve_reward(RewardSpec("broken"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    importlib.invalidate_caches()
    with pytest.raises(PluginError, match="unknown reward 'shout_length'"):
        resolve_reward(RewardSpec("shout_length"))


def test_config_section_is_accepted_as_spec() -> None:
    """The lead's pydantic RewardPluginConfig has the same fields and resolves directly."""
    from configs.algorithm import RewardPluginConfig

    spec = RewardPluginConfig(name="numeric", weight=2.0, args={"position": "first"})
    resolved = resolve_reward(spec)
    assert resolved.weight == 2.0 and resolved.fn.keywords == {"position": "first"}
