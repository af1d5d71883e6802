"""Where store-batched's time goes, for bench/buffer_vs_redis.py and buffer_before_after.py:
round trips and Redis commands per batch (profile_trips), client CPU per phase
(profile_phases) and redis-server's time per group inside each command (profile_server)."""

from __future__ import annotations

import gc
import importlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import redis
from buffer_loops import Cost, _raw_loop, _store_loop, meter

from buffer.episode import EpisodeGroup
from buffer.store import EpisodeStore


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


def profile_server(
    url: str, groups: list[EpisodeGroup], records: list[bytes], batch: int
) -> list[str]:
    """redis-server's time per group inside each command (INFO commandstats, commands run
    by scripts included and also inside EVALSHA's own figure), for raw and store-batched,
    beside its whole CPU per group (the rest is reading requests, writing replies, the AOF).
    commandstats times are wall clock inside the server: other load inflates them."""
    client = redis.Redis.from_url(url)
    stream = f"bench-raw-server-{time.time_ns()}"
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    store = EpisodeStore(url, f"bench-server-{time.time_ns()}", capacity=4 * batch)
    store.take_groups("bench", 1, block_ms=0)  # the once-per-consumer pending scan
    loops: dict[str, Callable[[], None]] = {
        "raw": lambda: _raw_loop(client, stream, groups, records, batch, "raw"),
        "store-batched": lambda: _store_loop(store, groups, batch, "batch", pool),
    }
    out = ["  redis-server per group: CPU, and time inside commands (commandstats; "
           f"load {os.getloadavg()[0]:.2f}):"]  # fmt: skip
    n = len(groups)
    with ThreadPoolExecutor(1) as pool:
        for name, loop in loops.items():
            client.config_resetstat()
            cost: list[Cost] = []
            with meter(client, cost):
                loop()
            stats = client.info("commandstats")
            stats.pop("cmdstat_info", None)
            inside = sum(v["usec"] for v in stats.values()) / n
            top = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:8]
            parts = ", ".join(f"{k.removeprefix('cmdstat_')} {v['usec'] / n:.1f}" for k, v in top)
            out.append(f"    {name:13s} CPU {cost[0].server_cpu / n * 1e6:5.1f} us; in commands "
                       f"{inside:5.1f} us: {parts}")  # fmt: skip
    client.delete(stream, *client.keys(f"{store.keys.prefix}*"))
    store.close()
    client.close()
    return out
