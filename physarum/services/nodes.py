"""What a job knows about the nodes it runs on: where each actor is, and whether every node
sees the run dir.

Design (a) of DESIGN.md "Multi-node": the run dir lives on storage every node mounts at the
same path. `check_run_dir` proves it at start-up: the driver writes a random token into the
run dir and one tiny task per node that holds a bundle reads it back; a node that cannot is
named in the error, before any actor fails later on a missing file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from physarum.errors import UserError

CHECK_FILE = ".node_check"
PLACEMENT_FILE = "placement.json"


def where(role: str, rank: int, device: str = "cpu") -> dict[str, Any]:
    """This process's place in the cluster, one row of placement.json."""
    context = ray.get_runtime_context()
    return {
        "role": role,
        "rank": rank,
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "device": device,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
    }


def node_ips() -> dict[str, str]:
    """Node id -> IP of every node Ray knows (alive or not)."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


@ray.remote(num_cpus=0, max_retries=0)
def _read_token(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_run_dir(root: Path, node_ids: set[str], timeout_s: float = 60.0) -> None:
    """Fail unless every node in `node_ids` reads the token the driver writes under `root`."""
    token = secrets.token_hex(16)
    path = root / CHECK_FILE
    path.write_text(token)
    refs = {
        node: _read_token.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        ).remote(str(path))
        for node in sorted(node_ids)
    }
    ips = node_ips()
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    blind = []
    for node, ref in refs.items():
        try:
            seen = ray.get(ref) if ref in ready else f"(no answer in {timeout_s:.0f} s)"
        except ray.exceptions.RayError as exc:
            seen = f"(the check failed: {type(exc).__name__})"
        if seen != token:
            blind.append(f"node {ips.get(node, node)} ({node[:12]}): {seen or 'no such file'}")
    path.unlink(missing_ok=True)
    if blind:
        raise UserError(
            f"run dir {root} is not shared: the driver wrote {path}, but "
            + "; ".join(blind)
            + ". Put run_dir on storage every node mounts at the same path (NFS, a shared "
            "volume), e.g. --set run_dir=/shared/runs/NAME"
        )


def write_placement(root: Path, rows: list[dict[str, Any]]) -> Path:
    """placement.json: one row per actor (and the driver), in role order."""
    order = {"driver": 0, "buffer": 1, "trainer": 2, "rollout": 3}
    rows = sorted(rows, key=lambda r: (order.get(r["role"], 9), r["rank"]))
    path = root / PLACEMENT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)
    return path


def driver_row() -> dict[str, Any]:
    """The driver's row of placement.json."""
    row = where("driver", 0)
    row["gpu_ids"] = []
    return row
