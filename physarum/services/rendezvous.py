"""How trainer ranks find each other: a TCPStore on rank 0's node, then torch.distributed.

Rank 0 hosts the store on its own node IP and a port it found free there; every rank
writes its arrival into the store, and rank 0 waits for all of them for at most the
rendezvous timeout. Ranks that never arrive are named (rank 0 returns them) instead of the
whole group hanging inside `init_process_group`, which has no idea who is missing.
"""

from __future__ import annotations

import datetime
import logging
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

_JOINED = "physarum/joined/"
_START = "physarum/start"


def join(
    master: tuple[str, int],
    *,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
    node_ip: str,
) -> list[int]:
    """Join the default process group; returns the ranks that did not arrive (rank 0 only;
    then no group is made). Other ranks raise when rank 0 gives up or never answers."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master[0], master[1], world_size, rank == 0, timeout=timeout, wait_for_workers=False
    )
    store.set(f"{_JOINED}{rank}", node_ip)
    if rank == 0:
        missing = _wait_for_ranks(store, world_size, timeout_s)
        store.set(_START, "abort" if missing else "go")
        if missing:
            return missing
    elif store.get(_START) != b"go":
        raise RuntimeError(f"trainer rank {rank}: rank 0 gave up the rendezvous (ranks missing)")
    dist.init_process_group(
        backend, store=dist.PrefixStore("physarum/pg", store), rank=rank, world_size=world_size
    )
    log.info("rank %d of %d joined (%s) via %s:%d", rank, world_size, backend, *master)
    return []


def _wait_for_ranks(store: dist.TCPStore, world_size: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    missing = list(range(world_size))
    while missing:
        missing = [r for r in missing if not store.check([f"{_JOINED}{r}"])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return missing
