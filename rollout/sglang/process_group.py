"""The sending side (rank 0) of SGLang's weight-update process group, without sglang.

`POST /init_weights_update_group` makes every SGLang TP rank call sglang's
`init_custom_process_group(backend, init_method="tcp://addr:port", world_size,
rank=rank_offset + tp_rank, group_name)`, which (sglang 0.5.23, srt/utils/common.py) does:
  1. the `tcp://` rendezvous: a TCPStore at addr:port, hosted by rank 0, that every rank joins;
  2. wraps it in `PrefixStore(group_name, store)`;
  3. `torch.distributed._new_process_group_helper(world_size, rank, [], backend, store,
     group_name=group_name)`, which prefixes the store again with `f"{group_name}/"` and, for
     the CPU device of gloo, with `"cpu/"`, builds `ProcessGroupGloo(store, rank, world_size,
     timeout)` (or `ProcessGroupNCCL`) and registers it as a non-default group.
The server then receives with `torch.distributed.broadcast(t, src=0, group=pg)`.

The main environment must not import sglang, and the sender has no default process group of
its own to hang a group on, so this module rebuilds the same key layout with public
torch.distributed classes: it hosts the TCPStore (it is rank 0), stacks the same three
prefixes, constructs the backend directly and broadcasts with the backend's own
`broadcast(...)`. Verified against a real sglang 0.5.23 server (torch 2.14.1) from torch
2.13.0 over gloo; NCCL follows the same layout but needs GPUs (untested here).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _gloo_backend(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta):
    backend = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", store), rank, world_size, timeout)
    backend._set_sequence_number_for_group()  # as torch's helper does (local for gloo)
    return backend


def _nccl_backend(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta):
    if not dist.is_nccl_available():
        raise RuntimeError("weight-update group backend 'nccl': this torch has no NCCL")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    backend = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", store), rank, world_size, options)
    backend._set_sequence_number_for_group()  # the NCCL handshake sglang's helper performs
    return backend


# backend name -> constructor of the rank-0 backend over the group's prefixed store
BACKENDS: dict[str, Callable[..., object]] = {"gloo": _gloo_backend, "nccl": _nccl_backend}


@dataclass
class WeightUpdateGroup:
    """Rank 0 of a weight-update group joined by SGLang workers (ranks 1..world_size-1)."""

    group_name: str
    world_size: int
    backend_name: str
    _store: dist.TCPStore
    _backend: object

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send `tensor` (contiguous, on the backend's device) from rank 0 to every rank."""
        if not tensor.is_contiguous():
            raise ValueError(f"{self.group_name}: broadcast needs a contiguous tensor")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        self._backend.broadcast([tensor], opts).wait()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Drop the backend and the store (the workers destroy their side over HTTP)."""
        shutdown = getattr(self._backend, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except RuntimeError as err:  # a peer already gone
                logger.debug("%s: backend shutdown: %s", self.group_name, err)
        self._backend = None
        self._store = None  # type: ignore[assignment]


def join_as_rank0(
    master_address: str,
    master_port: int,
    world_size: int,
    group_name: str,
    *,
    backend: str = "gloo",
    timeout: float = 120.0,
) -> WeightUpdateGroup:
    """Host the rendezvous store and join the group as rank 0.

    Blocks until all `world_size` ranks have joined, so call it concurrently with the HTTP
    `init_weights_update_group` calls of every worker (e.g. in a thread).
    """
    if backend not in BACKENDS:
        raise ValueError(f"weight-update backend: expected {sorted(BACKENDS)}, got {backend!r}")
    if world_size < 2:
        raise ValueError(f"world_size: expected >= 2 (rank 0 plus workers), got {world_size}")
    delta = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(
        master_address, master_port, world_size, True, timeout=delta, multi_tenant=True
    )
    prefixed = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
    made = BACKENDS[backend](prefixed, 0, world_size, delta)
    logger.info(
        "weight-update group %s: rank 0 of %d (%s) at %s:%d",
        group_name,
        world_size,
        backend,
        master_address,
        master_port,
    )
    return WeightUpdateGroup(group_name, world_size, backend, store, made)
