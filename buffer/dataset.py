"""Read a prompt dataset (JSONL or Parquet) into validated rows, reporting bad rows by line.

A row is a JSON object with at least the `required_keys` (by default `id` and `messages`).
`id` must be a non-empty string or an integer (stored as its string) and unique in the file.
Bad rows are skipped and counted (`on_bad_row="skip"`) or stop the load with a
DatasetError naming the line (`on_bad_row="fail"`). For Parquet, "line" is the 1-based row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MAX_REPORTED_ERRORS = 20
OnBadRow = Literal["skip", "fail"]


class DatasetError(ValueError):
    """A dataset that cannot be loaded: missing file, unknown format, or a bad row in fail mode."""


@dataclass
class LoadReport:
    """What a load did. `errors` holds the first MAX_REPORTED_ERRORS messages, with lines."""

    path: str
    n_loaded: int
    n_skipped: int
    errors: list[str] = field(default_factory=list)
    already_loaded: bool = False  # True when the namespace held this dataset already


@dataclass
class ParsedDataset:
    ids: list[str]  # in file order
    rows: list[str]  # the JSON text of each row, same order
    report: LoadReport
    fingerprint: str  # sha256 of the file bytes


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, parsed object or None, error or None); blank lines are ignored."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    lineno,
                    None,
                    f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})",
                )
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"invalid JSON ({exc.__class__.__name__}: {exc})"


def _read_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors are many and not a common base
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row, None


_READERS = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}


def _check_row(obj: Any, required: Sequence[str], seen: set[str]) -> tuple[str, str]:
    """Return (id, row JSON) or raise ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if obj.get(k) is None]
    if missing:
        raise ValueError(f"missing required key(s) {missing}")
    raw_id = obj.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
        raise ValueError(f"id must be a non-empty string or an integer, got {raw_id!r}")
    row_id = str(raw_id)
    if row_id in seen:
        raise ValueError(f"duplicate id {row_id!r}")
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON-serialisable ({exc})") from exc
    return row_id, text


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_dataset(
    path: str | Path,
    *,
    on_bad_row: OnBadRow = "skip",
    required_keys: Sequence[str] = ("id", "messages"),
) -> ParsedDataset:
    """Read and validate every row of `path` (.jsonl, .json lines, or .parquet)."""
    path = Path(path)
    if on_bad_row not in ("skip", "fail"):
        raise DatasetError(f"on_bad_row: expected 'skip' or 'fail', got {on_bad_row!r}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(f"{path}: unknown dataset format; expected one of {sorted(_READERS)}")
    required = tuple(dict.fromkeys(("id", *required_keys)))
    ids: list[str] = []
    rows: list[str] = []
    seen: set[str] = set()
    report = LoadReport(path=str(path), n_loaded=0, n_skipped=0)
    for lineno, obj, error in reader(path):
        if error is None:
            try:
                row_id, text = _check_row(obj, required, seen)
            except ValueError as exc:
                error = str(exc)
        if error is not None:
            message = f"{path.name}:{lineno}: {error}"
            if on_bad_row == "fail":
                raise DatasetError(message)
            report.n_skipped += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(message)
            continue
        seen.add(row_id)
        ids.append(row_id)
        rows.append(text)
    report.n_loaded = len(ids)
    return ParsedDataset(ids, rows, report, fingerprint(path))
