"""Read back an offline W&B run: the history rows stored in its `run-<id>.wandb` file.

wandb 0.31 writes records with its Go core and ships no Python reader, so this parses the
format itself: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB log blocks of
32 KiB holding chunks `crc32c (4) | length (2, LE) | type (1) | data`, type 1 a whole record,
2/3/4 its first/middle/last piece; each record is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (starts {data[:4]!r})")
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is zero padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # preallocated zeros at the end
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(path: Path, timeout_s: float = 120.0) -> list[Any]:
    """The records once the run's `exit` record is in: `run.finish()` can return before
    wandb's core process has flushed the file (seen on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = records(path) if path.exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout_s:.0f} s")
        time.sleep(0.2)


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every `run.log` row of the one offline run under run_dir/wandb, in order."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline run under {run_dir}/wandb, found {files}")
    rows = []
    for record in finished_records(files[0]):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
