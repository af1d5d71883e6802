"""The services table: where each trainer rank, rollout worker, the buffer and the driver run
(placement.json) joined with what the driver knows of them now (health, weight version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROLE_ORDER = {"driver": 0, "buffer": 1, "trainer": 2, "rollout": 3}


def live_view(services: dict[str, Any], version: int) -> dict[str, dict[str, Any]]:
    """`role-rank` -> {health, version} from the driver's service handles.

    health: "up" = a live actor the driver is using; "restarting" = a rollout worker being
    replaced (its node died). A lost trainer rank stops the job, so it is never shown as up.
    version: the trainer's weight version; for rollout workers the last version pushed to them
    (they swap it in between two decode steps)."""
    out: dict[str, dict[str, Any]] = {}
    if "buffer" in services:
        out["buffer-0"] = {"health": "up", "version": version}
    trainer = services.get("trainer")
    if trainer is not None:
        for rank in range(len(trainer.actors)):
            out[f"trainer-{rank}"] = {"health": "up", "version": version}
    rollout = services.get("rollout")
    if rollout is not None:
        for worker in list(rollout.actors):
            out[worker] = {"health": "up", "version": rollout.latest_version}
        for worker in list(rollout.starting):
            out[worker] = {"health": "restarting", "version": None}
    return out


def service_rows(placement: Path, live: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per service: placement.json's row (if written yet) with health and version."""
    rows: dict[str, dict[str, Any]] = {}
    for row in _read_rows(placement):
        rows[f"{row['role']}-{row['rank']}"] = dict(row)
    for key, info in live.items():
        role, _, rank = key.rpartition("-")
        rows.setdefault(key, {"role": role, "rank": int(rank)}).update(info)
    for key, row in rows.items():
        row.setdefault("health", "up" if row["role"] == "driver" else "stopped")
        row["name"] = key
    return sorted(rows.values(), key=lambda r: (ROLE_ORDER.get(r["role"], 9), r["rank"]))


def _read_rows(placement: Path) -> list[dict[str, Any]]:
    """placement.json's rows; none while it is absent or being rewritten (the next poll
    gets them)."""
    try:
        return json.loads(placement.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
