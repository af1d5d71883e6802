"""Real processes against a real redis-server: exactly-once under concurrency and crashes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import Counter
from pathlib import Path

from buffer.store import EpisodeStore
from tests.buffer import _workers
from tests.buffer.helpers import make_group, write_prompts

CTX = mp.get_context("spawn")  # fresh interpreters: no inherited sockets or threads


def _join(procs: list, timeout: float = 60) -> None:
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            raise AssertionError(f"{proc.name} did not finish in {timeout}s")
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"


def test_concurrent_producers_and_consumers_lose_and_duplicate_nothing(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    n_prompts = 60
    with EpisodeStore(redis_url, namespace) as store:
        store.load_prompts(write_prompts(tmp_path / "d.jsonl", n_prompts), seed=3, max_epochs=1)
    results, stop = CTX.Queue(), CTX.Event()
    producers = [
        CTX.Process(target=_workers.produce, args=(redis_url, namespace, f"w{i}", i, results),
                    name=f"producer-{i}")
        for i in range(3)
    ]  # fmt: skip
    consumers = [
        CTX.Process(target=_workers.consume, args=(redis_url, namespace, f"t{i}", stop, results),
                    name=f"consumer-{i}")
        for i in range(2)
    ]  # fmt: skip
    for proc in producers + consumers:
        proc.start()
    reports = [results.get(timeout=120) for _ in producers]
    _join(producers)
    stop.set()
    reports += [results.get(timeout=60) for _ in consumers]
    _join(consumers)

    taken = Counter(p for kind, _, got in reports if kind == "consumer" for p in got)
    assert sorted(taken) == sorted(f"p{i}" for i in range(n_prompts))  # nothing lost
    assert set(taken.values()) == {1}  # nothing duplicated
    counts = Counter()
    for kind, _, got in reports:
        if kind == "producer":
            counts.update(got)
    assert counts["pushed"] == n_prompts
    assert counts["abandoned"] > 0  # the crash path really ran
    with EpisodeStore(redis_url, namespace) as store:
        stats = store.stats()
    assert (stats.groups_put, stats.groups_acked, stats.prompts_done) == (n_prompts,) * 3
    assert stats.late_pushes == counts["refused"]
    assert stats.lease_expiries >= counts["abandoned"] + counts["refused"]
    assert (stats.groups_pending, stats.groups_unconsumed, stats.prompts_leased) == (0, 0, 0)


def test_killed_consumers_get_their_groups_redelivered(redis_url: str, namespace: str) -> None:
    with EpisodeStore(redis_url, namespace) as store:
        entries = [store.put_group(make_group(f"p{i}")) for i in range(5)]
    results = CTX.Queue()
    victims = {}
    for name in ("victim-a", "victim-b"):
        proc = CTX.Process(target=_workers.take_and_hang,
                           args=(redis_url, namespace, name, 2, results))  # fmt: skip
        proc.start()
        pid, held = results.get(timeout=60)  # it has taken its groups and is 'training'
        assert len(held) == 2
        victims[name] = (proc, held)
    for proc, _ in victims.values():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL

    with EpisodeStore(redis_url, namespace) as store:
        assert store.stats().groups_pending == 4
        # victim-a restarts under its own name: its unacked groups come first, then new ones
        restarted = CTX.Process(target=_workers.take_all,
                                args=(redis_url, namespace, "victim-a", results))  # fmt: skip
        restarted.start()
        again = results.get(timeout=60)
        _join([restarted])
        assert [e for e, _ in again] == victims["victim-a"][1] + [entries[4]]
        # victim-b never comes back: a survivor reclaims its groups
        assert store.reclaim("survivor", min_idle_ms=0) == 2
        rescued = store.take_groups("survivor", 10, block_ms=0)
        assert [t.entry_id for t in rescued] == victims["victim-b"][1]
        store.ack([t.entry_id for t in rescued])
        delivered = [p for _, p in again] + [t.group.prompt_id for t in rescued]
        assert sorted(delivered) == [f"p{i}" for i in range(5)]
        stats = store.stats()
        assert (stats.groups_pending, stats.groups_unconsumed, stats.groups_acked) == (0, 0, 5)
