"""The control-plane API serves status, metrics and buffer stats over real HTTP on 127.0.0.1."""

from __future__ import annotations

import httpx

from physarum.api import DashboardServer, JobState


def test_dashboard_serves_status_metrics_and_buffer() -> None:
    state = JobState(
        name="t", mode="rl", total_steps=10, buffer_stats=lambda: {"groups_unconsumed": 3}
    )
    server = DashboardServer(state).start()
    try:
        state.stage = "rl"
        state.publish(step=1, version=1, metrics={"reward": 0.25})
        state.publish(step=2, version=2, metrics={"reward": 0.5, "eval/accuracy": 0.4})
        status = httpx.get(f"{server.url}/api/status").json()
        assert (status["step"], status["version"], status["total_steps"]) == (2, 2, 10)
        assert status["eta_s"] is not None and status["eta_s"] >= 0
        records = httpx.get(f"{server.url}/api/metrics", params={"since": 1}).json()
        assert records == [{"step": 2, "stage": "rl", "reward": 0.5, "eval/accuracy": 0.4}]
        assert httpx.get(f"{server.url}/api/buffer").json() == {"groups_unconsumed": 3}
        page = httpx.get(server.url)
        assert page.status_code == 200 and "physarum: t" in page.text
    finally:
        server.stop()
