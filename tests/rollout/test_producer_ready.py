"""The producer's cap on groups waiting for the trainer (plan.max_ready): it leases nothing
while that many pushed groups are untaken, within the unchanged staleness quota. Against a
real redis-server."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from buffer.redis_server import EmbeddedRedis
from rollout.producer import RolloutProducer
from tests.rollout.test_producer import _producer, _store


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


def _capped(store, max_ready: int) -> RolloutProducer:
    producer = _producer(store, staleness=2, rewards=[0.0, 1.0])  # share 4: quota 12 at v0
    producer.plan = replace(producer.plan, max_ready=max_ready)
    return producer


def test_room_is_zero_while_the_cap_of_groups_waits(redis_url, tmp_path) -> None:
    producer = _capped(_store(redis_url, tmp_path, "room"), max_ready=4)
    producer.stats.groups_pushed = 8  # the trainer (version 0) may have taken 4 of them
    assert producer.ready_ahead() == 4
    assert producer._room() == 0
    producer.trainer_version = 1  # it trained batch 1 and took batch 2: nothing waits
    assert producer.ready_ahead() == 0
    assert producer._room() == 4  # the quota's 12 less the 8 pushed
    producer.plan = replace(producer.plan, max_ready=0)
    producer.trainer_version = 0
    assert producer._room() == 4  # no cap: the quota alone


@pytest.mark.parametrize(("max_ready", "pushed_after_update"), [(4, 12), (0, 16)])
def test_a_new_version_leases_only_below_the_cap(
    redis_url, tmp_path, max_ready: int, pushed_after_update: int
) -> None:
    """Groups in flight do not count against the cap: with generation held, the worker
    leases the whole quota (12 groups). Once they are pushed, 8 wait beyond the batch the
    trainer takes; the next version's 4 groups of quota are leased only without a cap."""
    producer = _capped(_store(redis_url, tmp_path, f"cap{max_ready}"), max_ready)
    go = asyncio.Event()
    inner = producer.generate_group

    async def held(row):
        await go.wait()
        return await inner(row)

    producer.generate_group = held

    async def scenario() -> list[int]:
        task = asyncio.create_task(producer.run())
        await asyncio.sleep(0.5)
        seen = [len(producer._in_flight)]
        go.set()
        await asyncio.sleep(0.5)
        seen.append(producer.stats.groups_pushed)
        producer.set_weight_version(1)
        await asyncio.sleep(0.8)
        seen.append(producer.stats.groups_pushed)
        producer.stop()
        await task
        return seen

    assert asyncio.run(scenario()) == [12, 12, pushed_after_update]
