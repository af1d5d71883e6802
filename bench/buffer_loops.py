"""The fixture and the put/take/ack loop of each path of bench/buffer_vs_redis.py, with the
CPU meter they run under (this process + redis-server). Shared by buffer_vs_redis.py,
buffer_profile.py and buffer_before_after.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import redis

from buffer.codec import decode_group, encode_group
from buffer.episode import Episode, EpisodeGroup
from buffer.store import EpisodeStore


def make_groups(n: int, episodes: int, tokens: int, prompt: int) -> list[EpisodeGroup]:
    rng = np.random.default_rng(0)
    groups = []
    for g in range(n):
        prompt_ids = rng.integers(0, 150_000, prompt)
        eps = [
            Episode.from_generation(
                prompt_ids=prompt_ids,
                response_ids=rng.integers(0, 150_000, tokens),
                logprobs=-rng.random(tokens).astype(np.float32),
                versions=np.zeros(tokens, np.int32),
                finish_reason="stop",
                metadata={"sample": i},
            )
            for i in range(episodes)
        ]
        groups.append(EpisodeGroup(f"p{g}", eps, {"worker": "bench"}))
    return groups


@dataclass
class Cost:
    """One run: wall seconds, and CPU seconds of this process and of redis-server."""

    wall: float
    client_cpu: float
    server_cpu: float


def _server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def meter(client: redis.Redis, out: list[Cost]) -> Iterator[None]:
    """Measure the block; CPU times do not depend on what else the machine runs."""
    server, cpu, wall = _server_cpu(client), time.process_time(), time.perf_counter()
    yield
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out.append(Cost(wall, cpu, _server_cpu(client) - server))


def run_store(
    url: str,
    groups: list[EpisodeGroup],
    batch: int,
    put: str,
    store_cls: type = EpisodeStore,
    touch: bool = False,
) -> Cost:
    """put: "one" (put_group per group), "threads" (put_group per group from a thread pool,
    as the rollout producer calls it) or "batch" (put_groups). store_cls: EpisodeStore, or
    an older tree's (bench/buffer_before_after.py). touch: read every taken group's
    episodes before the ack, as the trainer does (a DecodedGroup builds them then)."""
    store = store_cls(url, f"bench-store-{time.time_ns()}", capacity=4 * batch)
    cost: list[Cost] = []
    # asyncio.to_thread's default pool size, which the producer's puts run on
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
        with meter(store.client, cost):
            _store_loop(store, groups, batch, put, pool, touch)
    store.client.delete(*store.client.keys(f"{store.keys.prefix}*"))
    store.close()
    return cost[0]


def _store_loop(
    store: EpisodeStore,
    groups: list[EpisodeGroup],
    batch: int,
    put: str,
    pool: ThreadPoolExecutor,
    touch: bool = False,
) -> None:
    for i in range(0, len(groups), batch):
        chunk = groups[i : i + batch]
        if put == "batch":
            store.put_groups(chunk)
        elif put == "threads":
            list(pool.map(store.put_group, chunk))
        else:
            for group in chunk:
                store.put_group(group)
        taken = store.take_groups("bench", len(chunk), block_ms=1000)
        if len(taken) != len(chunk):
            raise RuntimeError(f"store: took {len(taken)} of {len(chunk)}")
        if touch:
            [t.group.episodes for t in taken]
        store.ack([t.entry_id for t in taken])


def run_raw(url: str, groups: list, records: list[bytes], batch: int, mode: str) -> Cost:
    """mode: "raw" (the encoded records), "codec" (encode and decode the groups) or "copies"
    (the records, plus the copies any codec with writable arrays makes: see _raw_loop)."""
    client = redis.Redis.from_url(url)
    stream = f"bench-raw-{time.time_ns()}"
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    cost: list[Cost] = []
    with meter(client, cost):
        _raw_loop(client, stream, groups, records, batch, mode)
    client.delete(stream)
    client.close()
    return cost[0]


def _arrays(group: EpisodeGroup) -> list[np.ndarray]:
    fields = ("prompt_ids", "response_ids", "rollout_logprobs", "versions", "loss_mask")
    return [getattr(e, name) for name in fields for e in group.episodes]


def _raw_loop(
    client: redis.Redis, stream: str, groups: list, records: list, batch: int, mode: str
) -> None:
    """One put + take + ack round per batch. "copies" adds, without any per-episode Python
    work, the memory traffic a codec cannot avoid: one join of each group's arrays before
    the put (discarded; the record sent is the pre-encoded one) and one copy of each record
    taken (the writable body)."""
    for i in range(0, len(records), batch):
        chunk = range(i, min(i + batch, len(records)))
        pipe = client.pipeline(transaction=False)
        for j in chunk:
            if mode == "codec":
                record = encode_group(groups[j])
            else:
                record = records[j]
                if mode == "copies":
                    b"".join(_arrays(groups[j]))
            pipe.xadd(stream, {"g": record, "v": 0, "p": f"p{j}"})
        pipe.execute()
        reply = client.xreadgroup("g", "bench", {stream: ">"}, count=len(chunk), block=1000)
        if mode == "codec":
            [decode_group(fields[b"g"]) for _, fields in reply[0][1]]
        elif mode == "copies":
            [bytearray(fields[b"g"]) for _, fields in reply[0][1]]
        ids = [entry_id for entry_id, _ in reply[0][1]]
        if len(ids) != len(chunk):
            raise RuntimeError(f"raw: took {len(ids)} of {len(chunk)}")
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, "g", *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
