"""Fixtures for the buffer tests: one REAL redis-server per test session, fresh namespaces.

The server is started by the same launcher the app uses (buffer.redis_server.EmbeddedRedis)
on a free 127.0.0.1 port with its data dir in a temp dir, and stopped at the end. Every test
gets its own namespace, so tests never see one another's keys.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from buffer.episode import Episode, EpisodeGroup
from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-session"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_store(redis_url: str, namespace: str) -> Iterator[Callable[..., EpisodeStore]]:
    """Build stores on the session server in this test's namespace; closed at teardown."""
    stores: list[EpisodeStore] = []

    def make(**kwargs) -> EpisodeStore:
        store = EpisodeStore(kwargs.pop("url", redis_url), kwargs.pop("ns", namespace), **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def make_group(
    prompt_id: str, *, n: int = 2, response_len: int = 8, version: int = 0, seed: int = 0
) -> EpisodeGroup:
    """A group of n single-turn episodes whose tokens were all generated at `version`."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 1000, 5)
    episodes = [
        Episode.from_generation(
            prompt_ids=prompt,
            response_ids=rng.integers(0, 1000, response_len),
            logprobs=-rng.random(response_len).astype(np.float32),
            versions=np.full(response_len, version),
            finish_reason="stop",
            metadata={"sample": i},
        )
        for i in range(n)
    ]
    for i, episode in enumerate(episodes):
        episode.reward = float(i)
    return EpisodeGroup(prompt_id, episodes, {"prompt": prompt_id})


def write_prompts(path: Path, n: int, *, start: int = 0) -> Path:
    """A JSONL dataset of n well-formed rows with ids p<start>..p<start+n-1>."""
    with path.open("w") as fh:
        for i in range(start, start + n):
            row = {"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
            fh.write(json.dumps(row) + "\n")
    return path
