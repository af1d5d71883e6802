"""Push a versioned `models.weight_update.WeightUpdate` into SGLang workers, three ways.

  tensor       POST /update_weights_from_tensor: the bucket's payload travels as SGLang's
               `flattened_bucket` (one shared-memory uint8 tensor + per-tensor metadata; the
               metadata objects are `types.SimpleNamespace`, which SGLang's SafeUnpickler
               allows) or as a plain [(name, tensor)] list. Same node only: the pickle names
               shared-memory files (CPU, sharing strategy "file_system") or CUDA IPC handles.
  distributed  POST /init_weights_update_group once per set of workers, then per bucket
               POST /update_weights_from_distributed while rank 0 (this process, see
               process_group.py) broadcasts: one uint8 buffer per bucket (`flattened_bucket`)
               or one broadcast per tensor. gloo here, NCCL across GPU nodes.
  disk         writes the update as safetensors under a staging directory and calls
               POST /update_weights_from_disk. Any node that shares the filesystem.

Tensor and distributed updates run inside /begin_weight_update ... /end_weight_update (SGLang
>= 0.5.21 refuses them outside a session). Names are HF checkpoint names; FP8 updates carry
`<x>.weight` (float8_e4m3fn) + `<x>.weight_scale_inv` (float32) pairs, checked before sending.
The new weight_version goes with the last bucket only, so a version is never reported for a
half-loaded model.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from models.weight_update import WeightBucket, WeightUpdate, iter_bucket_tensors
from rollout.http_client import serialize_named_tensors
from rollout.sglang.payloads import (
    WeightSyncError,
    broadcast_layout,
    check_fp8_pairs,
    dtype_name,
    flattened_bucket,
    serialize_object,
)
from rollout.sglang.process_group import WeightUpdateGroup, join_as_rank0
from rollout.sglang.server import free_port
from rollout.sglang.worker import Worker

logger = logging.getLogger(__name__)

__all__ = [
    "DiskSync",
    "DistributedSync",
    "TensorSync",
    "WEIGHT_SYNC_PATHS",
    "WeightSync",
    "WeightSyncError",
    "make_weight_sync",
    "push_update",
]


def _check_ok(result: Any, where: str) -> None:
    if isinstance(result, dict) and result.get("success") is False:
        raise WeightSyncError(f"{where}: {result.get('message')}")


async def _all(calls: Iterable[Awaitable[Any]], where: str) -> list[Any]:
    results = await asyncio.gather(*calls)
    for result in results:
        _check_ok(result, where)
    return results


class WeightSync(Protocol):
    """One way of moving weights into workers."""

    name: str
    needs_session: bool

    async def push(self, workers: list[Worker], update: WeightUpdate) -> None: ...

    async def forget(self, worker: Worker, live: list[Worker]) -> None: ...

    async def close(self, live: list[Worker]) -> None: ...


class TensorSync:
    """update_weights_from_tensor, one call per bucket and worker."""

    name = "tensor"
    needs_session = True

    def __init__(self, *, flattened: bool = True) -> None:
        self.flattened = flattened
        torch.multiprocessing.set_sharing_strategy("file_system")  # sglang_api.md A.3 #5

    def _payload(self, bucket: WeightBucket) -> str:
        if self.flattened:
            return serialize_object(flattened_bucket(bucket))
        return serialize_named_tensors(list(iter_bucket_tensors(bucket)))

    async def push(self, workers: list[Worker], update: WeightUpdate) -> None:
        fmt = "flattened_bucket" if self.flattened else None
        for i, bucket in enumerate(update.buckets):
            payload = self._payload(bucket)
            version = str(update.version) if i == len(update.buckets) - 1 else None
            calls = (
                w.client.update_weights_from_tensor(
                    [payload] * w.tp, load_format=fmt, flush_cache=False, weight_version=version
                )
                for w in workers
            )
            await _all(calls, f"tensor sync v{update.version} bucket {i}")

    async def forget(self, worker: Worker, live: list[Worker]) -> None:
        return None

    async def close(self, live: list[Worker]) -> None:
        return None


class DistributedSync:
    """init_weights_update_group + update_weights_from_distributed, this process as rank 0."""

    name = "distributed"
    needs_session = True

    def __init__(
        self,
        *,
        master_address: str = "127.0.0.1",
        backend: str = "gloo",
        flattened: bool = True,
        timeout: float = 120.0,
    ) -> None:
        self.master_address = master_address
        self.backend = backend
        self.flattened = flattened
        self.timeout = timeout
        self._groups: dict[tuple[str, ...], WeightUpdateGroup] = {}
        self._count = 0

    async def _group(self, workers: list[Worker]) -> WeightUpdateGroup:
        key = tuple(w.url for w in workers)
        if key in self._groups:
            return self._groups[key]
        self._count += 1
        name = f"physarum_wu_{self._count}_{int(time.time())}"
        port = free_port(self.master_address)
        world = 1 + sum(w.tp for w in workers)
        offsets = [1 + sum(w.tp for w in workers[:i]) for i in range(len(workers))]
        joins = [
            w.client.init_weights_update_group(
                self.master_address, port, off, world, group_name=name, backend=self.backend
            )
            for w, off in zip(workers, offsets)
        ]
        http = asyncio.gather(*joins)
        group = await asyncio.to_thread(
            join_as_rank0,
            self.master_address,
            port,
            world,
            name,
            backend=self.backend,
            timeout=self.timeout,
        )
        for result in await http:
            _check_ok(result, f"init_weights_update_group {name}")
        self._groups[key] = group
        return group

    def _broadcast_all(self, group: WeightUpdateGroup, tensors: list[Tensor]) -> None:
        for t in tensors:
            group.broadcast(t)

    async def push(self, workers: list[Worker], update: WeightUpdate) -> None:
        group = await self._group(workers)
        for i, bucket in enumerate(update.buckets):
            if self.flattened:
                names, dtypes, shapes, flat = broadcast_layout(bucket)
                tensors, fmt = [flat], "flattened_bucket"
            else:
                named = list(iter_bucket_tensors(bucket))
                names = [n for n, _ in named]
                dtypes = [dtype_name(t.dtype) for _, t in named]
                shapes = [list(t.shape) for _, t in named]
                tensors, fmt = [t.contiguous() for _, t in named], None
            version = str(update.version) if i == len(update.buckets) - 1 else None
            http = asyncio.gather(
                *(
                    w.client.update_weights_from_distributed(
                        names,
                        dtypes,
                        shapes,
                        group_name=group.group_name,
                        weight_version=version,
                        load_format=fmt,
                        flush_cache=False,
                    )
                    for w in workers
                )
            )
            try:
                await asyncio.to_thread(self._broadcast_all, group, tensors)
            except Exception as err:
                self._drop(group)
                http.cancel()
                raise WeightSyncError(
                    f"distributed sync v{update.version} bucket {i}: broadcast failed: {err}"
                ) from err
            for result in await http:
                _check_ok(result, f"distributed sync v{update.version} bucket {i}")

    def _drop(self, group: WeightUpdateGroup) -> None:
        for key, g in list(self._groups.items()):
            if g is group:
                del self._groups[key]
        group.close()

    async def forget(self, worker: Worker, live: list[Worker]) -> None:
        """A worker died: every group it was in is broken; destroy them on the live members."""
        for key, group in list(self._groups.items()):
            if worker.url not in key:
                continue
            members = [w for w in live if w.url in key and w.url != worker.url]
            await asyncio.gather(
                *(w.client.destroy_weights_update_group(group.group_name) for w in members),
                return_exceptions=True,
            )
            self._drop(group)

    async def close(self, live: list[Worker]) -> None:
        for key, group in list(self._groups.items()):
            members = [w for w in live if w.url in key]
            await asyncio.gather(
                *(w.client.destroy_weights_update_group(group.group_name) for w in members),
                return_exceptions=True,
            )
            self._drop(group)


class DiskSync:
    """Write safetensors under `staging_dir/v<version>/`, then update_weights_from_disk."""

    name = "disk"
    needs_session = False

    def __init__(self, *, staging_dir: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep: expected >= 1 version on disk, got {keep}")
        self.staging_dir = Path(staging_dir)
        self.keep = keep
        self.last_path: Path | None = None

    def write(self, update: WeightUpdate) -> Path:
        """The update as `<staging>/v<version>/model.safetensors`; older versions pruned."""
        from safetensors.torch import save_file

        out = self.staging_dir / f"v{update.version}"
        tmp = self.staging_dir / f".v{update.version}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {name: t.clone() for b in update.buckets for name, t in iter_bucket_tensors(b)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        versions = sorted(
            (p for p in self.staging_dir.glob("v*") if p.name[1:].isdigit()),
            key=lambda p: int(p.name[1:]),
        )
        for old in versions[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_path = out
        return out

    async def push(self, workers: list[Worker], update: WeightUpdate) -> None:
        path = await asyncio.to_thread(self.write, update)
        calls = (
            w.client.update_weights_from_disk(
                str(path), weight_version=str(update.version), flush_cache=False
            )
            for w in workers
        )
        await _all(calls, f"disk sync v{update.version} from {path}")

    async def forget(self, worker: Worker, live: list[Worker]) -> None:
        return None

    async def close(self, live: list[Worker]) -> None:
        return None


# name -> WeightSync class; the engine builds one with the keyword arguments it is given
WEIGHT_SYNC_PATHS: dict[str, type] = {
    "tensor": TensorSync,
    "distributed": DistributedSync,
    "disk": DiskSync,
}


def make_weight_sync(name: str, **kwargs: Any) -> WeightSync:
    if name not in WEIGHT_SYNC_PATHS:
        raise ValueError(
            f"weight sync path: expected one of {sorted(WEIGHT_SYNC_PATHS)}, got {name!r}"
        )
    return WEIGHT_SYNC_PATHS[name](**kwargs)


async def push_update(sync: WeightSync, workers: list[Worker], update: WeightUpdate) -> float:
    """Validate, push inside a weight-update session when the path needs one, then check that
    every worker reports the new version. Returns the seconds it took."""
    began = time.perf_counter()
    if update.fp8_block is not None:
        named = (kv for b in update.buckets for kv in iter_bucket_tensors(b))
        check_fp8_pairs(named, update.fp8_block)
    if sync.needs_session:
        await _all((w.client.begin_weight_update() for w in workers), "begin_weight_update")
    try:
        await sync.push(workers, update)
    finally:
        if sync.needs_session:
            ends = await asyncio.gather(
                *(w.client.end_weight_update() for w in workers), return_exceptions=True
            )
            for w, end in zip(workers, ends):
                if isinstance(end, BaseException):
                    logger.error("%s: end_weight_update failed: %s", w.url, end)
    versions = await asyncio.gather(*(w.client.weight_version() for w in workers))
    for w, got in zip(workers, versions):
        if got != str(update.version):
            raise WeightSyncError(
                f"{sync.name} sync: {w.url} reports weight_version {got!r} after pushing "
                f"version {update.version}"
            )
    return time.perf_counter() - began
