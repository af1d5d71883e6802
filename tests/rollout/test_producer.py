"""The producer's quota: how far rollout runs ahead is bounded by max_staleness; dynamic
sampling drops groups whose rewards are all equal. Against a real redis-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from buffer.episode import Episode
from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore
from rollout.producer import ProducerPlan, RolloutProducer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


class _NoEngine:
    async def abort(self, rids=None) -> None:
        return None


def _store(url: str, tmp_path: Path, name: str) -> EpisodeStore:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": str(i)}]}) + "\n"
            for i in range(100)
        )
    )
    store = EpisodeStore(url, name, capacity=64, max_staleness=5)
    store.load_prompts(rows)
    return store


def _producer(
    store: EpisodeStore, *, staleness: int, rewards: list[float], dynamic: bool = False
) -> RolloutProducer:
    async def generate(row):
        episodes = [
            Episode.from_generation([1], [2, 3], [-0.5, -0.5], [0, 0], "stop") for _ in rewards
        ]
        return episodes

    async def score(episodes):
        for e, r in zip(episodes, rewards, strict=True):
            e.reward = r

    plan = ProducerPlan(
        share=4, max_staleness=staleness, prompts_per_lease=3, dynamic_sampling=dynamic
    )
    return RolloutProducer(
        worker_id="w",
        engine=_NoEngine(),
        store=store,
        generate_group=generate,
        score_group=score,
        plan=plan,
    )


async def _run_until_idle(producer: RolloutProducer, seconds: float = 1.0) -> None:
    task = asyncio.create_task(producer.run())
    await asyncio.sleep(seconds)
    producer.stop()
    await task


def _hold_version_zero(producer) -> list[int]:
    """Make the producer's version-0 groups generate forever (until cancelled); returns the
    list of weight versions each group started at."""
    hold = asyncio.Event()  # never set
    inner = producer.generate_group
    started: list[int] = []

    async def generate(row):
        started.append(producer.weight_version)
        if producer.weight_version == 0:
            await hold.wait()
        return await inner(row)

    producer.generate_group = generate
    return started


def test_synchronous_quota_is_one_batch_per_weight_version(redis_url, tmp_path) -> None:
    store = _store(redis_url, tmp_path, "sync")
    producer = _producer(store, staleness=0, rewards=[0.0, 1.0])

    async def scenario() -> list[int]:
        seen = []
        task = asyncio.create_task(producer.run())
        await asyncio.sleep(0.8)
        seen.append(producer.stats.groups_pushed)
        producer.set_weight_version(1)  # new weights: the next batch may be made
        await asyncio.sleep(0.8)
        seen.append(producer.stats.groups_pushed)
        producer.stop()
        await task
        return seen

    assert asyncio.run(scenario()) == [4, 8]
    assert store.stats().groups_unconsumed == 8


def test_staleness_two_runs_three_batches_ahead(redis_url, tmp_path) -> None:
    store = _store(redis_url, tmp_path, "ahead")
    producer = _producer(store, staleness=2, rewards=[0.0, 1.0])
    asyncio.run(_run_until_idle(producer))
    assert producer.stats.groups_pushed == 12  # versions 0, 1 and 2 of weights 0


def test_dynamic_sampling_drops_equal_reward_groups_and_consumes_their_prompts(
    redis_url, tmp_path
) -> None:
    store = _store(redis_url, tmp_path, "dynamic")
    producer = _producer(store, staleness=0, rewards=[1.0, 1.0], dynamic=True)
    asyncio.run(_run_until_idle(producer, 0.5))
    stats = store.stats()
    assert producer.stats.groups_pushed == 0
    assert producer.stats.groups_filtered > 0
    assert stats.groups_put == 0
    assert stats.prompts_leased == 0  # filtered leases were closed, not left to expire


def test_stop_ends_a_wait_for_a_full_buffer_at_once_and_returns_the_leases(
    redis_url, tmp_path
) -> None:
    """The trainer has finished and will never take again: producers waiting for room (the
    600 s put_timeout_s of the default config) must not hold up the job's stop. Their groups
    are dropped and counted, their prompts go back to the queue."""
    rows = tmp_path / "rows.jsonl"
    row = {"messages": [{"role": "user", "content": "x"}]}
    rows.write_text("".join(json.dumps({"id": f"p{i}", **row}) + "\n" for i in range(20)))
    store = EpisodeStore(redis_url, "full", capacity=2, max_staleness=5, put_timeout_s=600)
    store.load_prompts(rows)
    producer = _producer(store, staleness=5, rewards=[0.0, 1.0])

    async def scenario() -> float:
        task = asyncio.create_task(producer.run())
        deadline = asyncio.get_running_loop().time() + 30
        # full, and a later group is waiting for room (pushed groups stop at capacity)
        while not (producer.stats.groups_pushed == 2 and producer._in_flight):
            assert asyncio.get_running_loop().time() < deadline, (producer.stats, store.stats())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the waiting pushes have retried against the full buffer
        began = asyncio.get_running_loop().time()
        producer.stop()
        await asyncio.wait_for(task, timeout=10)
        return asyncio.get_running_loop().time() - began

    seconds = asyncio.run(scenario())
    stats = store.stats()
    assert seconds < 2.0, f"stop took {seconds:.1f} s"
    assert stats.groups_unconsumed == 2 and stats.groups_put == 2
    assert producer.stats.groups_dropped >= 1
    assert stats.prompts_leased == 0  # every dropped group's prompt is back in the queue
    assert stats.prompts_queued == 20 - 2


async def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` (no timing assumption: only a generous deadline against hangs)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_groups_the_trainer_drops_as_stale_are_owed_again(redis_url, tmp_path) -> None:
    """A pushed group the trainer drops as stale was never trained: the worker owes it again,
    so drops do not shrink its window for good (the quota counted them as delivered)."""
    store = _store(redis_url, tmp_path, "credit")
    producer = _producer(store, staleness=0, rewards=[0.0, 1.0])

    async def scenario() -> None:
        task = asyncio.create_task(producer.run())
        await _until(lambda: producer.stats.groups_pushed == 4, "the first batch")
        store.set_version(10)  # far past max_staleness 5: the trainer drops all four
        assert store.take_groups("trainer", 4, block_ms=100) == []
        assert store.stats().drops_stale == 4
        producer.set_weight_version(1)  # quota 8: the 4 dropped are owed again, and 4 more
        await _until(lambda: producer.stats.groups_pushed == 12, "the owed groups")
        producer.stop()
        await task

    asyncio.run(scenario())
    assert producer.stats.groups_stale_credit == 4
    assert producer.stats.groups_pushed == 12  # room is 0 from there on: no more leases


def test_groups_too_stale_to_train_are_cancelled_and_their_prompts_requeued(
    redis_url, tmp_path
) -> None:
    """Groups leased under version 0 that are still generating when version 1 arrives (with
    max_staleness 0) could only be dropped by the trainer: they are cancelled at once, their
    leases released (prompts back in the queue), and fresh groups take their place."""
    store = _store(redis_url, tmp_path, "doomed")
    queued = store.stats().prompts_queued
    producer = _producer(store, staleness=0, rewards=[0.0, 1.0])
    started = _hold_version_zero(producer)

    async def scenario() -> None:
        task = asyncio.create_task(producer.run())
        await _until(lambda: len(started) == 4, "four version-0 groups generating")
        assert store.stats().prompts_leased == 4
        producer.set_weight_version(1)
        await _until(lambda: producer.stats.groups_pushed == 8, "eight version-1 groups")
        producer.stop()
        await task

    asyncio.run(scenario())
    assert producer.stats.groups_stale_aborted == 4
    assert started == [0] * 4 + [1] * 8
    stats = store.stats()
    assert stats.prompts_leased == 0  # the cancelled leases were released, not left to expire
    assert stats.groups_put == 8
    # 12 prompts were leased, 8 pushed: the 4 cancelled ones are queued again
    assert stats.prompts_queued == queued - 8


def test_the_trainer_version_ahead_of_the_worker_dooms_groups_too(redis_url, tmp_path) -> None:
    """The trainer's version (the buffer's) runs ahead of the worker's while an update
    travels: at worker version 1 with max_staleness 1 a version-0 group is still trainable by
    the worker's count, but not once the trainer is at version 2."""
    store = _store(redis_url, tmp_path, "ahead-doomed")
    producer = _producer(store, staleness=1, rewards=[0.0, 1.0])
    _hold_version_zero(producer)

    async def scenario() -> None:
        task = asyncio.create_task(producer.run())
        await _until(lambda: len(producer._in_flight) == 8, "eight version-0 groups")
        store.set_version(2)
        producer.set_weight_version(1)
        await _until(lambda: producer.stats.groups_stale_aborted == 8, "the cancels")
        producer.stop()
        await task

    asyncio.run(scenario())
    assert store.stats().prompts_leased == 0
