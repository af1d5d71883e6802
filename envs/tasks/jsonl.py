"""JSONL I/O for task rows: one JSON object per line, UTF-8, byte-for-byte reproducible."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("id", "messages", "label", "task")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` to `path` (parent directories created); returns the path.

    Keys keep their insertion order and non-ASCII text is written as is, so the same rows
    always give the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
    return path


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; rows need {list(REQUIRED_KEYS)}")
    messages = row["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        raise ValueError(f"{where}: 'messages' must be a list of objects with a 'role'")
    return row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines are skipped.

    Raises FileNotFoundError for a missing file and ValueError naming ``path:line`` for a
    line that is not JSON or a row without id/messages/label/task.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    rows = []
    with path.open("rb") as f:  # bytes: a bad encoding is reported with its line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 (byte {err.object[err.start]:#04x} at "
                    f"column {err.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            rows.append(_check_row(row, f"{path}:{number}"))
    return rows
