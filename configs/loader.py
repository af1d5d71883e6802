"""Load a job config from YAML plus `--set a.b=c` overrides, with errors a user can act on.

Every error names the file, the line and column (when the key is in the file), the dotted
field, the bad value and what is allowed. Unknown keys suggest the closest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from configs.job import JobConfig

Loc = tuple[str | int, ...]


class ConfigError(ValueError):
    """A config that cannot be loaded; `problems` holds one readable line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config {source}:\n{lines}")


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Read `path`, apply `key.path=value` overrides (YAML-typed values), validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    data, marks = _parse_yaml(text, str(path))
    overridden: set[Loc] = set()
    for item in overrides:
        loc = _apply_override(data, item)
        overridden.add(loc)
    return validate_job(data, source=str(path), marks=marks, overridden=overridden)


def validate_job(
    data: dict[str, Any],
    *,
    source: str = "<dict>",
    marks: dict[Loc, tuple[int, int]] | None = None,
    overridden: set[Loc] | None = None,
) -> JobConfig:
    """Validate a plain dict as a JobConfig, raising ConfigError with located messages."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            _describe(err, source, marks or {}, overridden or set()) for err in exc.errors()
        ]
        raise ConfigError(source, problems) from None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[Loc, tuple[int, int]]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(source, [f"YAML syntax error at {where}: {exc.problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections"])
    marks: dict[Loc, tuple[int, int]] = {}
    if node is not None:
        _collect_marks(node, (), marks)
    return data, marks


def _collect_marks(node: yaml.Node, loc: Loc, marks: dict[Loc, tuple[int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*loc, key_node.value)
            marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _collect_marks(value_node, child, marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            marks[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _collect_marks(item, child, marks)


def _apply_override(data: dict[str, Any], item: str) -> Loc:
    if "=" not in item:
        raise ConfigError("--set", [f"{item!r}: expected key.path=value"])
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError("--set", [f"{item!r}: empty key"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError("--set", [f"{key}: value {raw!r} is not valid YAML ({exc})"]) from None
    target = data
    for part in parts[:-1]:
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise ConfigError("--set", [f"{key}: {part!r} is a value, not a section"])
        target = child
    target[parts[-1]] = value
    return tuple(parts)


def _describe(
    err: Any, source: str, marks: dict[Loc, tuple[int, int]], overridden: set[Loc]
) -> str:
    loc: Loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "<top level>"
    where = _where(loc, source, marks, overridden)
    if err["type"] == "extra_forbidden":
        return f"{where}{dotted}: unknown key{_suggest(loc)}"
    if err["type"] == "missing":
        return f"{where}{dotted}: required but missing"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and err["loc"] == ():
        return f"{where}{message}"
    return f"{where}{dotted}: {message} (got {_short(err.get('input'))})"


def _where(loc: Loc, source: str, marks: dict[Loc, tuple[int, int]], overridden: set[Loc]) -> str:
    for n in range(len(loc), 0, -1):
        prefix = loc[:n]
        if prefix in overridden:
            return "--set: "
        if prefix in marks:
            line, column = marks[prefix]
            return f"{source}:{line}:{column}: "
    return ""


def _suggest(loc: Loc) -> str:
    """Name the valid keys of the section the unknown key sits in, closest first."""
    model: type[BaseModel] | None = JobConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return ""
        annotation = model.model_fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_section else None
    if model is None:
        return ""
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} valid keys: {', '.join(valid)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
