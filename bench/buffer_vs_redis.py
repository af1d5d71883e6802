"""Benchmark: episode groups through EpisodeStore vs raw pipelined Redis stream commands.

All paths move the same records (the codec's bytes of 8 episodes x 256 response tokens +
a 128-token prompt per group by default, ~27.6 KB) through the same redis-server, in rounds
of --batch groups (put a batch, take it, ack it, so the stream stays short as in training):

  raw            the already-encoded records: one pipeline of XADD (the record inline, plus
                 small v and p fields); one XREADGROUP; one MULTI of XACK + XDEL. 3 trips.
  raw+copies     raw, plus only the memory traffic a codec cannot avoid (a join of each
                 group's arrays before the put, a copy of each record taken, for writable
                 arrays), with no per-episode Python work: a floor for any codec of this kind
  raw+codec      raw, plus encode_group before XADD and decode_group after XREADGROUP: the
                 same work as the store minus its guarantees (leases, atomic push, capacity,
                 staleness, quarantine, payloads that outlive a crash), so store vs
                 raw+codec isolates the cost of those
  store          EpisodeStore.put_group per group (encode, then one trip: SET payload with a
                 TTL + the PUSH script), take_groups (GET version + XREADGROUP; then MULTI:
                 MGET payloads + staleness counts; decode + validate), ack (ACK script:
                 XACK + XDEL + payload DEL)
  store-threads  the same, put_group called from a pool of threads (asyncio.to_thread's
                 default size), as the rollout producer calls it: concurrent calls share
                 round trips (group_writer.py's group commit)
  store-batched  the same with put_groups: the batch's SETs and ONE PUSH script call for the
                 whole batch in one trip (4 trips per batch in all)

Prints the date, load average and torch thread count; groups/s, MB/s (record bytes) and the
ratio to raw by wall clock (best of --repeats runs, the paths interleaved), the CPU seconds
each path costs (this process + redis-server, which stays meaningful when other jobs share
the machine), round trips and Redis commands per batch (an untimed pass), and the codec's
us per group over distinct groups. --phases adds a pass that times each phase of
store-batched (encode, each round trip, decode, ack; client CPU per group). Usage:

    .venv/bin/python bench/buffer_vs_redis.py [--groups 2000] [--batch 32] [--url redis://...]
        [--phases] [--paths store-batched ...]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch

from buffer import codec_header
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


def run_store(
    url: str, groups: list[EpisodeGroup], batch: int, put: str, store_cls: type = EpisodeStore
) -> Cost:
    """put: "one" (put_group per group), "threads" (put_group per group from a thread pool,
    as the rollout producer calls it) or "batch" (put_groups). store_cls: EpisodeStore, or
    an older tree's (bench/buffer_before_after.py)."""
    store = store_cls(url, f"bench-store-{time.time_ns()}", capacity=4 * batch)
    cost: list[Cost] = []
    # asyncio.to_thread's default pool size, which the producer's puts run on
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
        with meter(store.client, cost):
            _store_loop(store, groups, batch, put, pool)
    store.client.delete(*store.client.keys(f"{store.keys.prefix}*"))
    store.close()
    return cost[0]


def _store_loop(
    store: EpisodeStore, groups: list[EpisodeGroup], batch: int, put: str, pool: ThreadPoolExecutor
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


def _decode_header(record: bytes) -> object:
    """The part of decode_group that parses and checks the header: read_header (the typed
    decode) where the codec has it, else msgpack and the column checks (older codecs, for
    before/after runs against an older buffer/)."""
    read = getattr(codec_header, "read_header", None)
    if read is not None:
        return read(record)
    header = codec_header._read_header(record)[0]
    return codec_header._fast_heads(header) or codec_header._check_header(header)


def per_item(fn: Callable[[object], object], items: list, repeats: int = 3) -> float:
    """Best-of-repeats CPU seconds per item of fn over distinct items (not one cached one)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, (time.process_time() - start) / len(items))
    return best


class Trips:
    """Counts round trips (socket sends of this process) while active, for the profile pass."""

    def __init__(self) -> None:
        self.count = 0
        self._send = redis.connection.AbstractConnection.send_packed_command

    def __enter__(self) -> Trips:
        send, trips, lock = self._send, self, threading.Lock()

        def counting(conn: object, command: object, check_health: bool = True) -> None:
            with lock:  # puts may come from several threads
                trips.count += 1
            return send(conn, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = counting
        return self

    def __exit__(self, *exc: object) -> None:
        redis.connection.AbstractConnection.send_packed_command = self._send


def _commands(client: redis.Redis) -> int:
    return sum(v["calls"] for v in client.info("commandstats").values())


def profile_trips(
    url: str, groups: list[EpisodeGroup], records: list[bytes], batch: int
) -> list[str]:
    """Round trips and Redis commands (scripts count their inner commands) per batch."""
    client = redis.Redis.from_url(url)
    chunk, encoded = groups[:batch], records[:batch]
    store = EpisodeStore(url, f"bench-trips-{time.time_ns()}", capacity=4 * batch)
    store.take_groups("bench", 1, block_ms=0)  # the once-per-consumer pending scan
    stream = f"bench-raw-trips-{time.time_ns()}"
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    steps: dict[str, list[tuple[str, Callable[[], object]]]] = {
        "raw": [("put+take+ack", lambda: _raw_loop(client, stream, chunk, encoded, batch, "raw"))],
        "store-batched": [
            ("put", lambda: store.put_groups(chunk)),
            ("take", lambda: taken.extend(store.take_groups("bench", batch, block_ms=1000))),
            ("ack", lambda: store.ack([t.entry_id for t in taken])),
        ],
        "store": [("put", lambda: [store.put_group(g) for g in chunk])],
        "store-threads": [("put", lambda: list(pool.map(store.put_group, chunk)))],
    }
    pool = ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4))
    out = [f"  round trips and Redis commands per batch of {batch} (untimed pass):"]
    for name, parts in steps.items():
        taken: list = []
        line = []
        for label, step in parts:
            before = _commands(client)
            with Trips() as trips:
                step()
            line.append(f"{label} {trips.count} trips {_commands(client) - before - 1} cmds")
        if name in ("store", "store-threads"):
            store.ack([t.entry_id for t in store.take_groups("bench", batch, block_ms=1000)])
            line.append("take and ack as store-batched")
        out.append(f"    {name:13s} " + ", ".join(line))
    pool.shutdown()
    client.delete(stream, *client.keys(f"{store.keys.prefix}*"))
    store.close()
    client.close()
    return out


@contextmanager
def _timed(spent: dict[str, float], owner: object, name: str, label: str) -> Iterator[None]:
    """While active, owner.name adds its CPU seconds (this process) to spent[label]."""
    fn = getattr(owner, name)

    def timed(*args: object, **kwargs: object) -> object:
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.process_time() - start

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def profile_phases(
    url: str, groups: list[EpisodeGroup], batch: int, package: str = "buffer"
) -> list[str]:
    """Client CPU per group of each phase of the store-batched loop (a separate pass with
    timers around the store's functions), and the server's CPU per group in that pass.
    package: the buffer package to profile ("buffer", or an older tree's under its name)."""
    import importlib
    from contextlib import ExitStack

    group_stream = importlib.import_module(f"{package}.group_stream")
    group_writer = importlib.import_module(f"{package}.group_writer")
    store_cls = importlib.import_module(f"{package}.store").EpisodeStore
    spent: dict[str, float] = {}
    wraps = [
        (group_writer, "encode_group_versioned", "encode"),
        (group_writer.GroupWriter, "_attempt", "put trip"),
        (group_stream.GroupStream, "_read", "take: GET+XREADGROUP trip"),
        (group_stream, "decode_group", "take: decode"),
        (group_stream.GroupStream, "_sort", "take: MULTI+MGET trip"),
        (group_stream.GroupStream, "ack", "ack trip"),
    ]
    store = store_cls(url, f"bench-phases-{time.time_ns()}", capacity=4 * batch)
    cost: list[Cost] = []
    collections: dict[int, list[float]] = {0: [], 1: [], 2: []}  # CPU s per pass, by gen
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.process_time())
        elif started:
            collections[info["generation"]].append(time.process_time() - started.pop())

    with ThreadPoolExecutor(1) as pool, ExitStack() as stack:
        for owner, name, label in wraps:
            stack.enter_context(_timed(spent, owner, name, label))
        gc.callbacks.append(on_gc)
        try:
            with meter(store.client, cost):
                _store_loop(store, groups, batch, "batch", pool)
        finally:
            gc.callbacks.remove(on_gc)
    store.client.delete(*store.client.keys(f"{store.keys.prefix}*"))
    store.close()
    spent["take: MULTI+MGET trip"] -= spent["take: decode"]  # _sort calls decode_group
    n = len(groups)
    out = [f"  store-batched phases ({package}), client CPU per group (a pass with timers; "
           f"load {os.getloadavg()[0]:.2f}):"]  # fmt: skip
    for label, seconds in spent.items():
        out.append(f"    {label:27s} {seconds / n * 1e6:6.1f} us")
    rest = cost[0].client_cpu - sum(spent.values())
    out.append(f"    {'rest of the loop':27s} {rest / n * 1e6:6.1f} us")
    out.append(f"    {'client total':27s} {cost[0].client_cpu / n * 1e6:6.1f} us, "
               f"server {cost[0].server_cpu / n * 1e6:.1f} us")  # fmt: skip
    gc_line = ", ".join(f"gen{g} {len(t)} passes {sum(t) / n * 1e6:.1f} us"
                        for g, t in collections.items())  # fmt: skip
    out.append(f"    of which the cyclic GC (inside the phases above): {gc_line}")
    return out


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
    peers = [p for p in ("raw", "raw+codec") if p in table and p != name and name != "raw"]
    return "".join(f"  {table[p] / seconds:.2f} of {p}" for p in peers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="groups per put/take round")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="response tokens per episode")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5, help="best of N alternating runs")
    parser.add_argument("--url", default=None, help="an existing server (default: embedded)")
    parser.add_argument(
        "--phases", action="store_true", help="also time each phase of store-batched (a pass)"
    )
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="gc.freeze() the fixture (the groups and records, ~20 tracked objects per group) "
        "before timing, so the cyclic collector's full passes do not traverse it: they are "
        "triggered by the objects each decode creates, so without this the fixture's size "
        "weighs on the decoding paths",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        default=None,
        help="run only these paths (default all; raw is always run, the ratios need it)",
    )
    args = parser.parse_args()

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    print(f"{stamp}  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  "
          f"torch threads {torch.get_num_threads()} (unused here)")  # fmt: skip
    groups = make_groups(args.groups, args.episodes, args.tokens, args.prompt)
    records = [encode_group(g) for g in groups]
    mb = sum(len(r) for r in records) / 1e6
    if args.freeze:  # the fixture out of the collector's way (see --freeze's help)
        gc.collect()
        gc.freeze()
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.url else EmbeddedRedis(Path(tmp) / "redis")
        url = args.url or server.start()
        try:
            runs = {
                "raw": lambda: run_raw(url, groups, records, args.batch, "raw"),
                "raw+copies": lambda: run_raw(url, groups, records, args.batch, "copies"),
                "raw+codec": lambda: run_raw(url, groups, records, args.batch, "codec"),
                "store": lambda: run_store(url, groups, args.batch, "one"),
                "store-threads": lambda: run_store(url, groups, args.batch, "threads"),
                "store-batched": lambda: run_store(url, groups, args.batch, "batch"),
            }
            if args.paths:
                unknown = set(args.paths) - set(runs)
                if unknown:
                    parser.error(f"--paths: unknown {sorted(unknown)}; choose from {list(runs)}")
                runs = {k: v for k, v in runs.items() if k == "raw" or k in args.paths}
            costs: dict[str, list[Cost]] = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleave, keep the best of each
                for name, run in runs.items():
                    costs[name].append(run())
            trips = profile_trips(url, groups, records, args.batch)
            phases = profile_phases(url, groups, args.batch) if args.phases else []
        finally:
            if server is not None:
                server.stop()
    print(f"{args.groups} groups of {args.episodes} x {args.tokens} tokens "
          f"(+{args.prompt} prompt), {len(records[0])} B/record, batch {args.batch}, "
          f"best of {args.repeats}, fixture {'frozen' if args.freeze else 'not frozen'} "
          "for the GC")  # fmt: skip
    report(costs, args.groups, mb)
    print("\n".join(trips + phases))
    n = min(len(groups), 500)
    enc = per_item(encode_group, groups[:n])
    dec = per_item(decode_group, records[:n])
    head = per_item(_decode_header, records[:n])
    print(f"  codec (CPU, {n} distinct groups): encode {enc * 1e6:.0f} us/group, "
          f"decode+validate {dec * 1e6:.0f} us/group, of which the header (msgpack + "
          f"checks) {head * 1e6:.0f} us")  # fmt: skip
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
