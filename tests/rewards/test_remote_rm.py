"""The remote reward model against a real FastAPI server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rewards.builtins.remote_rm import RemoteRewardError, RemoteRewardModel
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from tests.rewards.conftest import episode_with


class RewardServer:
    """A tiny reward server; `bodies[path]` records every JSON body it received."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[Any]] = {}
        self.flaky_failures = 0
        app = FastAPI()

        def score(items: list[dict]) -> list[float]:
            return [len(i["response"]) + float(i["response"] == i["label"]) for i in items]

        @app.post("/score")
        async def plain(request: Request) -> Any:
            items = await self._record("/score", request)
            return score(items)

        @app.post("/flaky")
        async def flaky(request: Request) -> Any:
            items = await self._record("/flaky", request)
            if self.flaky_failures < 2:
                self.flaky_failures += 1
                return JSONResponse({"detail": "warming up"}, status_code=503)
            return {"rewards": [{"quality": x, "bonus": 1.0} for x in score(items)]}

        @app.post("/hang")
        async def hang(request: Request) -> Any:
            await self._record("/hang", request)
            await asyncio.sleep(30)
            return []

        @app.post("/bad_request")
        async def bad(request: Request) -> Any:
            await self._record("/bad_request", request)
            return JSONResponse({"detail": "no"}, status_code=422)

        @app.post("/short")
        async def short(request: Request) -> Any:
            await self._record("/short", request)
            return [1.0]

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)

    async def _record(self, path: str, request: Request) -> list[dict]:
        body = await request.json()
        self.bodies.setdefault(path, []).append(body)
        return body

    def __enter__(self) -> RewardServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("reward server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RewardServer]:
    with RewardServer() as running:
        yield running


def episodes(n: int) -> list:
    return [episode_with("ab" * (i + 1), label="abab", prompt_text=f"prompt {i}") for i in range(n)]


def test_batched_post_with_slime_items(server: RewardServer) -> None:
    model = RemoteRewardModel(url=f"{server.url}/score", batch_size=2)
    values = asyncio.run(model(episodes(5)))
    assert values == [2.0, 5.0, 6.0, 8.0, 10.0]  # len(response) + exact-match bonus
    bodies = server.bodies["/score"]
    assert sorted(len(b) for b in bodies) == [1, 2, 2]
    assert {"prompt": "prompt 1", "response": "abab", "label": "abab"} in [
        item for body in bodies for item in body
    ]


def test_retries_with_backoff_then_succeeds(server: RewardServer) -> None:
    episode_list = episodes(2)
    spec = RewardSpec(
        "remote_rm", args={"url": f"{server.url}/flaky", "backoff_s": 0.05, "max_retries": 3}
    )
    with build_reward_fn([spec], timeout_s=20) as reward_fn:
        asyncio.run(reward_fn.score_group(episode_list))
    assert len(server.bodies["/flaky"]) == 3  # two 503s, then the answer
    assert [e.reward for e in episode_list] == [3.0, 6.0]  # quality + bonus
    assert episode_list[1].rewards == {
        "remote_rm": 6.0,
        "remote_rm/quality": 5.0,
        "remote_rm/bonus": 1.0,
    }


def test_hanging_server_times_out_into_error_episodes(server: RewardServer) -> None:
    episode_list = episodes(3)
    spec = RewardSpec(
        "remote_rm",
        args={"url": f"{server.url}/hang", "timeout_s": 0.3, "max_retries": 1, "backoff_s": 0.05},
    )
    with build_reward_fn([spec, RewardSpec("exact")], timeout_s=20) as reward_fn:
        asyncio.run(reward_fn.score_group(episode_list))
    assert len(server.bodies["/hang"]) == 2  # first try + one retry, both timed out
    for episode in episode_list:
        assert episode.is_error and episode.reward == 0.0
        assert "failed after 2 attempts: ReadTimeout" in episode.metadata["error"]


def test_reward_fn_timeout_bounds_a_hanging_call(server: RewardServer) -> None:
    episode_list = episodes(1)
    spec = RewardSpec("remote_rm", args={"url": f"{server.url}/hang", "timeout_s": 30})
    with build_reward_fn([spec], timeout_s=0.5) as reward_fn:
        asyncio.run(reward_fn.score_group(episode_list))
    assert episode_list[0].metadata["error"] == "reward 'remote_rm' timed out after 0.5s"


@pytest.mark.parametrize(
    "path, fragment",
    [("/bad_request", "answered HTTP 422"), ("/short", "expected a list of 2 rewards")],
)
def test_client_errors_fail_without_retry(server: RewardServer, path: str, fragment: str) -> None:
    model = RemoteRewardModel(url=f"{server.url}{path}", max_retries=3, backoff_s=5)
    with pytest.raises(RemoteRewardError, match=fragment):
        asyncio.run(model(episodes(2)))
    assert len(server.bodies[path]) == 1


def test_unreachable_server_is_retried_then_fails() -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    model = RemoteRewardModel(url=f"http://127.0.0.1:{port}/x", max_retries=2, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="failed after 3 attempts: ConnectError"):
        asyncio.run(model(episodes(1)))
