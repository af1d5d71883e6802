"""The real sglang-router (PyPI sglang-router 0.3.2, Rust) in front of two embedded servers:
workers are added with POST /workers (0.3.2 has no /add_worker) and /generate is routed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
import torch

from rollout.embedded import EmbeddedEngine
from rollout.http_client import SGLangClient
from rollout.server import ServerThread, free_port, make_state
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import greedy_reference, tiny_model

torch.set_num_threads(1)
pytest.importorskip("sglang_router")


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = pred()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"sglang-router: {what} not reached in {timeout} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    port, metrics = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics),
        "--log-level", "warn",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("router") / "router.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{url}/health").status_code == 200, 60, "router /health")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def test_router_routes_generate_to_both_embedded_servers(router, tmp_path):
    model = tiny_model(seed=4)
    engines = [
        EmbeddedEngine(model, max_running=4, context_len=64, eos_token_ids=[], name=f"worker{i}")
        for i in range(2)
    ]
    servers = [ServerThread(make_state(e, str(tmp_path), no_auth=True)).start() for e in engines]
    try:
        with httpx.Client(base_url=router, timeout=60) as c:
            for s in servers:
                r = c.post("/workers", json={"url": s.url})
                assert r.status_code == 202 and r.json()["status"] == "accepted"

            def healthy():
                workers = c.get("/workers").json()["workers"]
                return sum(w["is_healthy"] for w in workers) == 2 and workers

            workers = _wait(healthy, 60, "two healthy workers")
            assert {w["url"] for w in workers} == {s.url for s in servers}
            before = [e.stats()["num_forwards"] for e in engines]
            body = {
                "input_ids": [5, 1, 4],
                "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            }
            items = [c.post("/generate", json=body) for _ in range(4)]
        assert all(r.status_code == 200 for r in items)
        expected = greedy_reference(model, [5, 1, 4], 4)
        for r in items:
            item = r.json()  # passed through unchanged: SGLang's shape from our server
            assert item["output_ids"] == expected
            assert item["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
        after = [e.stats()["num_forwards"] for e in engines]
        assert all(a > b for a, b in zip(after, before)), "round_robin must use both workers"

        async def through_client():
            async with SGLangClient(router) as client:
                reqs = [GenerateRequest([2, 7], SamplingParams(max_new_tokens=3, temperature=0))]
                return await client.generate(reqs * 4)

        outs = asyncio.run(through_client())
        assert all(o.output_ids == greedy_reference(model, [2, 7], 3) for o in outs)
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.shutdown()
