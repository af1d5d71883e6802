"""Environment resolution: the same mechanism as rewards (`rewards.resolver`).

A name is an import path ``pkg.module:Attr``, a built-in name (`BUILTIN_ENVS`) or an entry
point of group ``physarum.envs``. What it names is an environment factory:

* a class: each episode gets ``Class(**args)``; or, when the class defines a classmethod
  ``factory(**args) -> Callable[[], Env]``, that is called ONCE and its result makes the
  per-episode instances (so expensive, read-only state such as a search index or a probed
  sandbox is built once and shared);
* any other callable: each episode gets ``target(**args)``.

`resolve_env` runs once at job start: it binds the args, builds one probe instance and checks
it against the `envs.base.Env` protocol, so a bad name, bad args or a broken class fail then,
not in the middle of a rollout.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from envs.base import EnvFactory
from rewards.resolver import (
    PluginError,
    accepts_one_positional,
    build_with_args,
    entry_point_names,
    load_plugin,
)

ENV_GROUP = "physarum.envs"

BUILTIN_ENVS: Mapping[str, str] = MappingProxyType(
    {
        "calculator": "envs.calculator:CalculatorEnv",
        "python": "envs.python_sandbox:PythonSandboxEnv",
        "search": "envs.search:SearchEnv",
    }
)


def valid_env_names() -> list[str]:
    """Built-in names plus the installed entry points of group physarum.envs."""
    return sorted({*BUILTIN_ENVS, *entry_point_names(ENV_GROUP)})


def resolve_env(name: str, args: Mapping[str, Any] | None = None) -> EnvFactory:
    """A checked factory making one fresh environment per episode; PluginError if not."""
    args = dict(args or {})
    target = load_plugin(name, builtins=BUILTIN_ENVS, group=ENV_GROUP, kind="env")
    if not callable(target):
        raise PluginError(f"env {name!r}: resolved to a {type(target).__name__}, not a factory")
    hook = getattr(target, "factory", None) if inspect.isclass(target) else None
    if callable(hook):
        factory = build_with_args(hook, args, kind="env", name=name)
    else:
        factory = functools.partial(target, **args)
    probe = build_with_args(factory, {}, kind="env", name=f"{name} with args {sorted(args)}")
    _check(name, probe)
    return factory


def _check(name: str, env: Any) -> None:
    for method in ("reset", "step"):
        fn = getattr(env, method, None)
        if not callable(fn) or not accepts_one_positional(fn):
            raise PluginError(
                f"env {name!r}: {type(env).__name__}.{method} must be a method taking one "
                "argument (see envs.base.Env)"
            )
    if not hasattr(env, "tools"):
        raise PluginError(f"env {name!r}: {type(env).__name__} has no `tools` attribute")
