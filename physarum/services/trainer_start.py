"""The driver's side of the trainer ranks' lifecycle on a cluster: bring the ranks together
(naming any rank that never arrives, and its node) and notice a rank that is lost.

A lost rank stops the job: the others would wait in their next collective for as long as
torch.distributed's timeout. What was checkpointed survives, so the message says how to
resume.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayActorError

from configs import JobConfig
from physarum.errors import ClusterError
from physarum.services.nodes import node_ips

JOIN_SLACK_S = 30.0
"""Beyond the rendezvous timeout, for rank 0 to report who is missing."""
START_S = 60.0
"""At least this long for the ranks' processes to start (Python and torch imports on a busy
node), however short the rendezvous timeout."""


def join_group(actors: list[Any], timeout_s: float, placement: Any = None) -> dict[int, str]:
    """Every rank joins torch.distributed at rank 0's node IP and a port free there; returns
    rank -> node IP. ClusterError names the ranks (and nodes) that did not start or join."""
    labels = bundle_nodes(len(actors), placement)
    rows = [a.where.remote() for a in actors]
    start_s = max(timeout_s, START_S)
    ready, _ = ray.wait(rows, num_returns=len(rows), timeout=start_s)
    silent = [r for r, ref in enumerate(rows) if ref not in ready]
    if silent:
        raise ClusterError(_missing("did not start", silent, labels, start_s))
    for rank, ref in enumerate(rows):
        labels[rank] = _get_row(rank, ref, labels)["node_ip"]
    master = ray.get(actors[0].address.remote())
    refs = [a.join.remote(master, timeout_s) for a in actors]
    ready, _ = ray.wait(refs[:1], timeout=timeout_s + JOIN_SLACK_S)
    if not ready:
        raise ClusterError(_missing("never answered as rendezvous host", [0], labels, timeout_s))
    try:
        missing = ray.get(refs[0])
    except RayActorError as exc:
        raise ClusterError(f"trainer rank 0 ({labels[0]}) died in the rendezvous: {exc}") from exc
    if missing:
        raise ClusterError(
            _missing(f"did not join {master[0]}:{master[1]}", missing, labels, timeout_s)
        )
    return labels


def _get_row(rank: int, ref: ray.ObjectRef, labels: dict[int, str]) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except RayActorError as exc:
        raise ClusterError(f"trainer rank {rank} ({labels[rank]}) failed to start: {exc}") from exc


def _missing(what: str, ranks: list[int], labels: dict[int, str], timeout_s: float) -> str:
    named = ", ".join(f"rank {r} (node {labels.get(r, 'unknown')})" for r in ranks)
    return (
        f"trainer rendezvous: {named} {what} within {timeout_s:.0f} s "
        "(cluster.rendezvous_timeout_s). Check that the node is alive and that the trainer "
        "nodes reach each other on their Ray node IPs"
    )


def bundle_nodes(ranks: int, placement: Any) -> dict[int, str]:
    """rank -> IP of the node holding its bundle ('unknown' without a placement)."""
    if placement is None:
        return {r: "unknown" for r in range(ranks)}
    ips, nodes = node_ips(), placement.node_ids()
    return {r: ips.get(nodes.get(f"trainer-{r}", ""), "unknown") for r in range(ranks)}


def check_lost(
    actors: list[Any],
    refs: list[ray.ObjectRef],
    ready: list[ray.ObjectRef],
    job: JobConfig,
    nodes: dict[int, str] | None = None,
) -> None:
    """Raise what a finished call raised; a dead rank becomes a ClusterError naming its node
    and the command that resumes the job."""
    for rank, ref in enumerate(refs):
        if ref not in ready:
            continue
        try:
            ray.get(ref)
        except RayActorError as exc:
            node = (nodes or {}).get(rank, "unknown")
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterError(
                f"trainer rank {rank} on node {node} was lost ({cause}). The job stops here; "
                f"continue it from its last checkpoint with: physarum run --resume "
                f"{job.resolved_run_dir}"
            ) from exc
