"""`ray job submit --working-dir . -- physarum run ...` against a real `ray start --head`.

The head runs in its own session on free ports and is stopped by killing that session only
(`ray stop` would stop every Ray on the machine). Inside the job RAY_ADDRESS is set, so
`physarum run` joins the cluster instead of starting an embedded Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from physarum.api import free_port
from tests.physarum.test_job import TINY

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _private_ports() -> list[str]:
    """Free ports for every listener, so other Rays on this machine (their dashboard agent
    holds the default 52365) cannot make ours half-start."""
    flags = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
    )
    return [f"--{flag}={free_port()}" for flag in flags]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    port, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    temp = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *_private_ports(),
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert head.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
        time.sleep(0.5)
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_runs_a_toy_grpo_job(ray_head: tuple[str, dict], tmp_path: Path) -> None:
    address, env = ray_head
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *TINY, "trainer.steps=2", "rollout.eval.interval=0"]
    entrypoint = ["physarum", "run", "configs/toy_grpo.yaml"]
    for item in overrides:
        entrypoint += ["--set", item]
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        "--",
        *entrypoint,
    ]
    for _ in range(30):  # the head answers HTTP before its job agent is up
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO
        )
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower()
    assert "joining the Ray cluster" in output  # not an embedded Ray
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records if "reward" in r}) == [1, 2]
    assert (run_dir / "hf" / "config.json").exists()
