"""The control-plane API serves status, metrics, buffer stats and services over real HTTP on
127.0.0.1, every route behind the dashboard's token."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import httpx
import pytest

from physarum.api import JobState
from physarum.dashboard import DashboardServer
from physarum.errors import UserError


def test_dashboard_serves_status_metrics_and_buffer(tmp_path: Path) -> None:
    state = JobState(
        name="t", mode="rl", total_steps=10, buffer_stats=lambda: {"groups_unconsumed": 3}
    )
    server = DashboardServer(state, run_dir=tmp_path).start()
    auth = {"Authorization": f"token {server.token}"}
    try:
        state.stage = "rl"
        state.publish(step=1, version=1, metrics={"reward": 0.25})
        state.publish(step=2, version=2, metrics={"reward": 0.5, "eval/accuracy": 0.4})
        status = httpx.get(f"{server.base_url}api/status", headers=auth).json()
        assert (status["step"], status["version"], status["total_steps"]) == (2, 2, 10)
        assert status["eta_s"] is not None and status["eta_s"] >= 0
        records = httpx.get(
            f"{server.base_url}api/metrics", params={"since": 1}, headers=auth
        ).json()
        assert records == [{"step": 2, "stage": "rl", "reward": 0.5, "eval/accuracy": 0.4}]
        buffer = httpx.get(f"{server.base_url}api/buffer", headers=auth).json()
        assert buffer == {"groups_unconsumed": 3}
        page = httpx.get(server.url)
        assert page.status_code == 200 and 'physarum <span class="name">t</span>' in page.text
        assert page.cookies["physarum_token"] == server.token  # the page's fetches use it
        info = json.loads((tmp_path / "dashboard.json").read_text())
        assert info["url"] == server.url and info["port"] == server.port
        assert stat.S_IMODE((tmp_path / "dashboard.json").stat().st_mode) == 0o600
    finally:
        server.stop()
    assert not (tmp_path / "dashboard.json").exists()


def test_every_route_needs_the_token() -> None:
    state = JobState(name="t", mode="rl")
    server = DashboardServer(state).start()
    try:
        for path in ("", "api/status", "api/metrics", "api/buffer", "api/services", "nothing"):
            url = f"{server.base_url}{path}"
            assert httpx.get(url).status_code == 401, path
            assert httpx.get(url, params={"token": "wrong"}).status_code == 401, path
            assert httpx.get(url, cookies={"physarum_token": "wrong"}).status_code == 401, path
        ok = httpx.get(
            f"{server.base_url}api/status", headers={"Authorization": "Bearer " + server.token}
        )
        assert ok.status_code == 200
        js = httpx.get(f"{server.base_url}static/dashboard.js", params={"token": server.token})
        assert js.status_code == 200 and "drawLines" in js.text  # shipped in the package
    finally:
        server.stop()


def test_non_finite_metrics_go_out_as_null() -> None:
    state = JobState(name="t", mode="rl")
    server = DashboardServer(state).start()
    try:
        state.publish(step=1, version=1, metrics={"reward": math.nan, "train/kl": math.inf})
        got = httpx.get(f"{server.base_url}api/metrics", params={"token": server.token}).json()
        assert got[0]["reward"] is None and got[0]["train/kl"] is None
    finally:
        server.stop()


def test_a_taken_port_is_a_clear_error() -> None:
    server = DashboardServer(JobState(name="t", mode="rl")).start()
    try:
        with pytest.raises(UserError, match="logging.dashboard_port"):
            DashboardServer(JobState(name="u", mode="rl"), port=server.port)
    finally:
        server.stop()
