"""Benchmark: episode groups through EpisodeStore vs raw pipelined Redis stream commands.

Both paths move the same records (8 episodes x 256 response tokens per group by default)
through the same redis-server in the same run:

  store          put_group (encode + one Lua call: lease/capacity check + XADD) per group,
                 then take_groups (XREADGROUP + staleness check + decode/validate), ack
                 (XACK + XDEL)
  store-batched  the same with put_groups: the batch's Lua calls in one pipelined trip
  raw            the already-encoded bytes: pipelined XADD, XREADGROUP, XACK + XDEL
  raw+codec      raw, plus encode_group before XADD and decode_group after XREADGROUP: the
                 same work as the store minus its guarantees (leases, atomic push, capacity,
                 staleness, acks that delete payloads), so store vs raw+codec isolates those

Rounds of --batch groups alternate put and take, so the stream stays short, as in training.
Prints groups/s, MB/s (record bytes) and the ratio store/raw by wall clock, and the CPU
seconds each path costs (this process + redis-server), which stays meaningful when other
jobs share the machine. Usage:

    .venv/bin/python bench/buffer_vs_redis.py [--groups 2000] [--batch 32] [--url redis://...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from buffer.codec import decode_group, encode_group
from buffer.episode import Episode, EpisodeGroup
from buffer.redis_server import EmbeddedRedis
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


def run_store(url: str, groups: list[EpisodeGroup], batch: int, batched_put: bool) -> Cost:
    store = EpisodeStore(url, f"bench-store-{time.time_ns()}", capacity=4 * batch)
    cost: list[Cost] = []
    with meter(store.client, cost):
        _store_loop(store, groups, batch, batched_put)
    store.client.delete(*store.client.keys(f"{store.keys.prefix}*"))
    store.close()
    return cost[0]


def _store_loop(store: EpisodeStore, groups: list[EpisodeGroup], batch: int, batched: bool) -> None:
    for i in range(0, len(groups), batch):
        chunk = groups[i : i + batch]
        if batched:
            store.put_groups(chunk)
        else:
            for group in chunk:
                store.put_group(group)
        taken = store.take_groups("bench", len(chunk), block_ms=1000)
        if len(taken) != len(chunk):
            raise RuntimeError(f"store: took {len(taken)} of {len(chunk)}")
        store.ack([t.entry_id for t in taken])


def run_raw(url: str, items: list, batch: int, codec: bool) -> Cost:
    """items: encoded records (codec=False) or groups to encode and decode (codec=True)."""
    client = redis.Redis.from_url(url)
    stream = f"bench-raw-{time.time_ns()}"
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    cost: list[Cost] = []
    with meter(client, cost):
        _raw_loop(client, stream, items, batch, codec)
    client.delete(stream)
    client.close()
    return cost[0]


def _raw_loop(client: redis.Redis, stream: str, items: list, batch: int, codec: bool) -> None:
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        pipe = client.pipeline(transaction=False)
        for j, item in enumerate(chunk):
            record = encode_group(item) if codec else item
            pipe.xadd(stream, {"g": record, "v": 0, "p": f"p{i + j}"})
        pipe.execute()
        reply = client.xreadgroup("g", "bench", {stream: ">"}, count=len(chunk), block=1000)
        if codec:
            [decode_group(fields[b"g"]) for _, fields in reply[0][1]]
        ids = [entry_id for entry_id, _ in reply[0][1]]
        if len(ids) != len(chunk):
            raise RuntimeError(f"raw: took {len(ids)} of {len(chunk)}")
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, "g", *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()


def per_item(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def report(costs: dict[str, list[Cost]], n: int, mb: float) -> None:
    """Best wall time and best total CPU (client + server) of each path, with ratios to raw."""
    wall = {name: min(c.wall for c in runs) for name, runs in costs.items()}
    cpu = {name: min(c.client_cpu + c.server_cpu for c in runs) for name, runs in costs.items()}
    print("  wall clock (best run):")
    for name, seconds in wall.items():
        print(f"    {name:13s} {n / seconds:7.0f} groups/s {mb / seconds:7.1f} MB/s"
              f"{_ratios(wall, name, seconds)}")  # fmt: skip
    print("  CPU per group, client + redis-server (insensitive to other load on the machine):")
    for name, runs in costs.items():
        best = min(runs, key=lambda c: c.client_cpu + c.server_cpu)
        ratios = _ratios(cpu, name, cpu[name])
        print(f"    {name:13s} {cpu[name] / n * 1e6:6.0f} us = {best.client_cpu / n * 1e6:4.0f} "
              f"client + {best.server_cpu / n * 1e6:4.0f} server "
              f"({n / cpu[name]:6.0f} groups per CPU-s){ratios}")  # fmt: skip


def _ratios(table: dict[str, float], name: str, seconds: float) -> str:
    peers = [p for p in ("raw", "raw+codec") if p != name and (p == "raw" or name != "raw")]
    return "".join(f"  {table[p] / seconds:.2f} of {p}" for p in peers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="groups per put/take round")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="response tokens per episode")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=3, help="best of N alternating runs")
    parser.add_argument("--url", default=None, help="an existing server (default: embedded)")
    args = parser.parse_args()

    groups = make_groups(args.groups, args.episodes, args.tokens, args.prompt)
    records = [encode_group(g) for g in groups]
    mb = sum(len(r) for r in records) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.url else EmbeddedRedis(Path(tmp) / "redis")
        url = args.url or server.start()
        try:
            runs = {
                "raw": lambda: run_raw(url, records, args.batch, codec=False),
                "raw+codec": lambda: run_raw(url, groups, args.batch, codec=True),
                "store": lambda: run_store(url, groups, args.batch, batched_put=False),
                "store-batched": lambda: run_store(url, groups, args.batch, batched_put=True),
            }
            costs: dict[str, list[Cost]] = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleave, keep the best of each
                for name, run in runs.items():
                    costs[name].append(run())
        finally:
            if server is not None:
                server.stop()
    print(f"{args.groups} groups of {args.episodes} x {args.tokens} tokens "
          f"(+{args.prompt} prompt), {len(records[0])} B/record, batch {args.batch}, "
          f"best of {args.repeats}")  # fmt: skip
    report(costs, args.groups, mb)
    enc = per_item(lambda: encode_group(groups[0]), 500)
    dec = per_item(lambda: decode_group(records[0]), 500)
    print(f"  codec: encode {enc * 1e6:.0f} us/group, decode+validate {dec * 1e6:.0f} us/group")


if __name__ == "__main__":
    main()
