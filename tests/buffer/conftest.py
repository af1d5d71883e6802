"""Fixtures for the buffer tests: one REAL redis-server per test session, fresh namespaces.

The server is started by the same launcher the app uses (buffer.redis_server.EmbeddedRedis)
on a free 127.0.0.1 port with its data dir in a temp dir, and stopped at the end. Every test
gets its own namespace, so tests never see one another's keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

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
