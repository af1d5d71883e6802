"""Bodies of the producer and consumer processes used by the multi-process buffer tests.

They run in `spawn`ed processes (a fresh interpreter each), so they live in an importable
module and take only picklable arguments.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from buffer.store import EpisodeStore
from tests.buffer.helpers import make_group


def produce(url: str, namespace: str, worker: str, seed: int, results: Any) -> None:
    """Lease prompts until the dataset is done; misbehave on purpose now and then.

    - abandon (15 %, and always the first lease: the crash path runs whatever the timing
      hands each producer): keep the lease and never push, as a crashed worker would;
    - slow (10 %): push only after the lease expired, so the push may be refused as late;
    - otherwise push at once.
    """
    rng = random.Random(seed)
    counts = {"pushed": 0, "refused": 0, "abandoned": 0}
    store = EpisodeStore(url, namespace, capacity=8, lease_seconds=0.25, put_timeout_s=60)
    try:
        while True:
            leases = store.lease_prompts(worker, 2)
            if not leases:
                stats = store.stats()
                if stats.prompts_leased == 0 and stats.prompts_queued == 0:
                    break
                time.sleep(0.05)
                continue
            for lease in leases:
                roll = rng.random()
                if roll < 0.15 or not any(counts.values()):
                    counts["abandoned"] += 1
                    continue
                if roll < 0.25:
                    time.sleep(0.3)
                group = make_group(lease.prompt_id, n=2, response_len=16, seed=rng.randrange(99))
                group.metadata["worker"] = worker
                entry = store.put_group(group, lease_id=lease.lease_id)
                counts["pushed" if entry else "refused"] += 1
    finally:
        store.close()
    results.put(("producer", worker, counts))


def consume(url: str, namespace: str, consumer: str, stop: Any, results: Any) -> None:
    """Take, 'train', ack; report every prompt id taken. Exit once stopped and drained."""
    store = EpisodeStore(url, namespace, capacity=8)
    taken: list[str] = []
    try:
        while True:
            batch = store.take_groups(consumer, 4, block_ms=100)
            if not batch:
                if stop.is_set():
                    break
                continue
            taken += [t.group.prompt_id for t in batch]
            store.ack([t.entry_id for t in batch])
    finally:
        store.close()
    results.put(("consumer", consumer, taken))


def take_and_hang(url: str, namespace: str, consumer: str, n: int, results: Any) -> None:
    """Take n groups, report them, then 'train' forever without acking (to be SIGKILLed)."""
    store = EpisodeStore(url, namespace)
    batch = store.take_groups(consumer, n, block_ms=5000)
    results.put((os.getpid(), [t.entry_id for t in batch]))
    while True:
        time.sleep(1)


def take_all(url: str, namespace: str, consumer: str, results: Any) -> None:
    """Take everything available under `consumer`, ack it, report (entry id, prompt id)."""
    store = EpisodeStore(url, namespace)
    got = []
    while batch := store.take_groups(consumer, 10, block_ms=0):
        got += [(t.entry_id, t.group.prompt_id) for t in batch]
        store.ack([t.entry_id for t in batch])
    store.close()
    results.put(got)
