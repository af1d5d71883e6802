"""One plugin-resolution mechanism, shared by rewards and environments.

A plugin name is resolved ONCE, at job start, in this order:

1. an import path ``pkg.module:attr`` (``attr`` may be dotted: ``pkg.mod:Class.method``);
2. a short built-in name, looked up in the caller's table of built-ins; the table maps each
   name to an import path, so a built-in is just an alias and loads lazily;
3. an entry point of the caller's group (``physarum.rewards`` or ``physarum.envs``) whose
   name equals the plugin name, as declared by an installed distribution, e.g.
   ``[project.entry-points."physarum.rewards"] my_reward = "my_pkg.rewards:score"``.

A caller may also have *families*: a built-in name that takes an argument, written
``family:arg`` (``reasoning_gym:leg_counting`` for tasks). The family's import path names a
factory called with ``arg``; a family name wins over rule 1 for that prefix only.

Anything else raises `PluginError` listing the valid built-in and entry-point names. This
module only finds the object; `rewards.registry` and `envs.registry` bind arguments to it and
check it against their protocol.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any


class PluginError(ValueError):
    """A plugin that cannot be found, loaded, built or that breaks its protocol."""


def entry_point_names(group: str) -> list[str]:
    """Names of the installed entry points of `group`, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def import_object(path: str) -> Any:
    """Load ``pkg.module:attr``; PluginError naming the path and what went wrong."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise PluginError(f"import path {path!r}: expected the form 'pkg.module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"import path {path!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(
                f"import path {path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    return obj


def load_plugin(
    name: str,
    *,
    builtins: Mapping[str, str],
    group: str,
    kind: str,
    families: Mapping[str, str] | None = None,
) -> Any:
    """Find the object named `name` (family, import path, built-in name or entry point).

    Args:
      name: the plugin name from the config.
      builtins: short name -> import path of the built-in plugins of this kind.
      group: the entry-point group searched after the built-ins.
      kind: "reward", "env" or "task"; used in error messages.
      families: family name -> import path of a factory taking the text after the colon.
    """
    family, sep, arg = name.partition(":")
    if sep and families and family in families:
        factory = import_object(families[family])
        try:
            return factory(arg)
        except ValueError as exc:  # the factory's message names what is valid
            raise PluginError(str(exc)) from exc
    if ":" in name:
        return import_object(name)
    if name in builtins:
        return import_object(builtins[name])
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if matches:
        try:
            return matches[0].load()
        except Exception as exc:
            raise PluginError(
                f"{kind} {name!r}: entry point {matches[0].value!r} of group {group!r} "
                f"failed to load: {exc}"
            ) from exc
    valid = sorted(builtins)
    installed = entry_point_names(group)
    raise PluginError(
        f"unknown {kind} {name!r}. Valid built-in names: {', '.join(valid)}. "
        f"Entry points in group {group!r}: {', '.join(installed) or '(none installed)'}. "
        f"{_family_hint(families)}Or give an import path 'pkg.module:attr'."
    )


def _family_hint(families: Mapping[str, str] | None) -> str:
    if not families:
        return ""
    return f"Families: {', '.join(f'{f}:<name>' for f in sorted(families))}. "


def accepts_one_positional(fn: Callable[..., Any]) -> bool:
    """True when `fn(x)` binds: exactly one positional argument is required or allowed."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # builtins without a signature: trust callable()
    try:
        signature.bind(object())
    except TypeError:
        return False
    return True


def is_async_callable(fn: Any) -> bool:
    """True when calling `fn` returns a coroutine (async def function, method or __call__)."""
    if inspect.iscoroutinefunction(fn):
        return True
    for klass in type(fn).__mro__:  # the __call__ Python would use
        if "__call__" in klass.__dict__:
            return inspect.iscoroutinefunction(klass.__dict__["__call__"])
    return False


def build_with_args(target: Any, args: Mapping[str, Any], *, kind: str, name: str) -> Any:
    """Call `target(**args)`; PluginError naming the plugin and its args if that fails."""
    try:
        return target(**dict(args))
    except Exception as exc:  # noqa: BLE001 - any failure to build names the plugin
        raise PluginError(
            f"{kind} {name!r}: cannot build it with args {sorted(args)}: {exc}"
        ) from exc
