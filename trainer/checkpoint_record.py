"""What a checkpoint records about itself, so that a resume can trust it or refuse it.

Written by rank 0 after every rank has saved and before the COMPLETE marker:
  buffer_state.json  the buffer as this checkpoint leaves it (RL jobs only): the policy
                     version, the buffer's `groups_acked` counter before and after the acks of
                     this checkpoint's groups, and the prompt cursor (epoch, pos)
  MANIFEST.json      size and sha256 of every other file of the checkpoint directory

`verify` re-hashes the files: a truncated, corrupted or missing file is named. A resume
compares `buffer_state.json` with the live buffer (physarum/resume.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILE = "MANIFEST.json"
BUFFER_STATE_FILE = "buffer_state.json"
_NOT_HASHED = {MANIFEST_FILE, "COMPLETE"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BufferRecord:
    """The buffer's state at a checkpoint. acked_after - acked_before = the groups that the
    steps since the previous checkpoint consumed (acknowledged right after COMPLETE)."""

    version: int
    acked_before: int
    acked_after: int
    epoch: int
    cursor: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name not in _NOT_HASHED and not p.name.endswith(".tmp")
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_buffer_record(directory: Path, stats: Any, version: int, n_acks: int) -> None:
    """stats: the buffer's BufferStats read before this checkpoint's acks; n_acks: the
    distinct groups those acks cover."""
    record = BufferRecord(
        version=version,
        acked_before=int(stats.groups_acked),
        acked_after=int(stats.groups_acked) + n_acks,
        epoch=int(stats.epoch),
        cursor=int(stats.cursor),
    )
    _write_atomic(directory / BUFFER_STATE_FILE, json.dumps(asdict(record)))


def read_buffer_record(directory: Path) -> BufferRecord | None:
    path = directory / BUFFER_STATE_FILE
    if not path.exists():
        return None
    return BufferRecord(**json.loads(path.read_text()))


def write_manifest(directory: Path) -> None:
    """Size and sha256 of every file now in `directory` (all ranks must have saved)."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(directory)
    }
    _write_atomic(directory / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def has_manifest(directory: Path) -> bool:
    return (directory / MANIFEST_FILE).is_file()


def verify(directory: Path) -> list[str]:
    """What is wrong with the checkpoint's files ([] = intact). A checkpoint without a
    manifest (written before checksums existed) is reported as such."""
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        return [f"{MANIFEST_FILE} is missing"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST_FILE} is unreadable ({exc})"]
    problems = []
    for name, want in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {want['size']}")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{name} fails its sha256 checksum")
    return problems
