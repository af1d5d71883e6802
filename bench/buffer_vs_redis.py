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
  store          EpisodeStore.put_group per group (encode, then one trip: MULTI, MSET of the
                 payload + the PUSH script, EXEC), take_groups (GET version + XREADGROUP;
                 then MULTI: MGET payloads + staleness counts; decode + validate), ack (ACK
                 script: XACK + XDEL + payload DEL)
  store-threads  the same, put_group called from a pool of threads (asyncio.to_thread's
                 default size), as the rollout producer calls it: concurrent calls share
                 round trips (group_writer.py's group commit)
  store-batched  the same with put_groups: ONE MSET of the batch's payloads and ONE PUSH
                 script call for the whole batch in one trip (4 trips per batch in all)
  store-b+eps    store-batched, reading every taken group's episodes before the ack, as the
                 trainer does: decode_group validates everything but builds the Episode
                 objects (and the writable copy of the body) on first read, so this path
                 shows what the trainer pays for them

Prints the date, load average and torch thread count; groups/s, MB/s (record bytes) and the
ratio to raw by wall clock (best of --repeats runs, the paths interleaved), the CPU seconds
each path costs (this process + redis-server, which stays meaningful when other jobs share
the machine), round trips and Redis commands per batch (an untimed pass), and the codec's
us per group over distinct groups. --phases adds a pass that times each phase of
store-batched (encode, each round trip, decode, ack; client CPU per group) and one that
reads redis-server's time per command (bench/buffer_profile.py). Usage:

    .venv/bin/python bench/buffer_vs_redis.py [--groups 2000] [--batch 32] [--url redis://...]
        [--phases] [--paths store-batched ...]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from buffer_loops import Cost, make_groups, run_raw, run_store
from buffer_profile import profile_phases, profile_server, profile_trips

from buffer import codec_header
from buffer.codec import decode_group, encode_group
from buffer.redis_server import EmbeddedRedis


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
                "store-b+eps": lambda: run_store(url, groups, args.batch, "batch", touch=True),
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
            phases = []
            if args.phases:
                phases = profile_phases(url, groups, args.batch)
                phases += profile_server(url, groups, records, args.batch)
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
    built = per_item(lambda r: decode_group(r).episodes, records[:n])
    print(f"  codec (CPU, {n} distinct groups): encode {enc * 1e6:.0f} us/group, "
          f"decode+validate {dec * 1e6:.0f} us/group, of which the header (msgpack + "
          f"checks) {head * 1e6:.0f} us; decode and build the episodes "
          f"{built * 1e6:.0f} us/group")  # fmt: skip
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
