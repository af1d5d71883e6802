"""Environment resolution: built-in names, import paths, entry points; one instance each."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from envs.base import Env
from envs.registry import BUILTIN_ENVS, resolve_env, valid_env_names
from rewards.resolver import PluginError

SAMPLES = "tests.envs.sample_envs"


@pytest.mark.parametrize("name", sorted(BUILTIN_ENVS))
def test_builtins_resolve_to_fresh_instances(name: str) -> None:
    factory = resolve_env(name)
    first, second = factory(), factory()
    assert first is not second and isinstance(first, Env)
    assert first.tools and first.tools[0]["function"]["name"] in ("calculator", "python", "search")


def test_factory_hook_shares_read_only_state() -> None:
    factory = resolve_env("search", {"top_k": 2})
    first, second = factory(), factory()
    assert first.index is second.index and first.top_k == 2
    python = resolve_env("python", {"cpu_s": 2, "processes": 4})
    assert python().sandbox is python().sandbox and python().sandbox.cpu_s == 2


def test_import_path_class_and_function() -> None:
    env = resolve_env(f"{SAMPLES}:EchoEnv", {"rounds": 3})()
    assert env.rounds == 3
    assert resolve_env(f"{SAMPLES}:make_echo")().rounds == 2


@pytest.mark.parametrize(
    "name, args, fragment",
    [
        ("calculater", {}, "unknown env 'calculater'. Valid built-in names: calculator, python"),
        (f"{SAMPLES}:NoStep", {}, "NoStep.step must be a method"),
        (f"{SAMPLES}:EchoEnv", {"round": 1}, "cannot build it with args"),
        ("search", {"top_k": 0}, "top_k: expected >= 1"),
        ("search", {"corpus_path": "/nonexistent.jsonl"}, "No such file"),
    ],
)
def test_bad_envs_fail_at_resolution(name: str, args: dict, fragment: str) -> None:
    with pytest.raises(PluginError) as info:
        resolve_env(name, args)
    assert fragment in str(info.value)


def test_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "physarum_test_envs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: physarum-test-envs\n")
    (dist / "entry_points.txt").write_text(f"[physarum.envs]\necho = {SAMPLES}:EchoEnv\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert "echo" in valid_env_names()
    env = resolve_env("echo", {"rounds": 5})()
    assert type(env).__name__ == "EchoEnv" and env.rounds == 5
