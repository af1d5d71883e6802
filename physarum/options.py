"""Small parsers for command-line options (`KEY=VALUE` lists)."""

from __future__ import annotations

from typing import Any

import yaml

from physarum.errors import UserError


def parse_key_values(items: list[str], *, flag: str) -> dict[str, Any]:
    """Parse ["digits=3", "ops=+-"] into {"digits": 3, "ops": "+-"} (values typed as YAML)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        result[key.strip()] = value
    return result
