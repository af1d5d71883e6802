"""The services table joins placement.json with the driver's live view of each service."""

from __future__ import annotations

import json
from pathlib import Path

from physarum.dashboard.services import service_rows


def row(role: str, rank: int, ip: str) -> dict:
    return {"role": role, "rank": rank, "node_ip": ip, "pid": 100 + rank, "device": "cpu"}


def test_rows_join_placement_with_health_and_version(tmp_path: Path) -> None:
    placement = tmp_path / "placement.json"
    rows = [row("rollout", 1, "10.0.0.3"), row("trainer", 0, "10.0.0.2"), row("driver", 0, "1")]
    rows += [row("rollout", 0, "10.0.0.3")]
    placement.write_text(json.dumps(rows))
    live = {
        "trainer-0": {"health": "up", "version": 7},
        "rollout-0": {"health": "up", "version": 7},
        "rollout-1": {"health": "restarting", "version": None},
    }
    got = service_rows(placement, live)
    assert [r["name"] for r in got] == ["driver-0", "trainer-0", "rollout-0", "rollout-1"]
    by_name = {r["name"]: r for r in got}
    assert by_name["trainer-0"]["node_ip"] == "10.0.0.2" and by_name["trainer-0"]["version"] == 7
    assert by_name["rollout-1"]["health"] == "restarting"
    assert by_name["driver-0"]["health"] == "up"


def test_before_placement_json_the_live_services_are_listed(tmp_path: Path) -> None:
    got = service_rows(tmp_path / "placement.json", {"trainer-0": {"health": "up", "version": 0}})
    assert got == [
        {"role": "trainer", "rank": 0, "health": "up", "version": 0, "name": "trainer-0"}
    ]


def test_a_service_no_longer_live_is_shown_stopped(tmp_path: Path) -> None:
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps([row("rollout", 0, "10.0.0.3")]))
    assert service_rows(placement, {})[0]["health"] == "stopped"
