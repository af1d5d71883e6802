"""Ray placement groups for the job: a bundle per trainer rank, rollout worker and the buffer.

Reserving everything up front means a job either gets all its resources or fails at start
with a message saying what is short, instead of hanging half-started. The user steers roles
to nodes with Ray custom resources (`cluster.trainer_resources` etc.) added to each bundle.
Trainer ranks of one tensor-parallel group share a STRICT_PACK group (never two nodes);
the rollout workers share one group with `cluster.rollout_strategy`; the buffer has its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs import JobConfig
from physarum.errors import UserError
from physarum.placement_plan import trainer_tp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    """One placement group to reserve: bundle names and resources, and its strategy."""

    name: str
    strategy: str
    bundles: dict[str, dict[str, float]]


def group_specs(
    job: JobConfig, *, trainers: int, workers: int, buffer: bool = False
) -> list[GroupSpec]:
    """The placement groups of a job (empty roles are left out)."""
    cluster = job.cluster
    specs: list[GroupSpec] = []
    tp = trainer_tp(job)
    trainer = _bundle(cluster.trainer_cpus, cluster.trainer_gpus, cluster.trainer_resources)
    for first in range(0, trainers, tp):
        ranks = range(first, min(first + tp, trainers))
        specs.append(
            GroupSpec(
                f"trainer-tp{first // tp}", "STRICT_PACK", {f"trainer-{r}": trainer for r in ranks}
            )
        )
    if workers:
        rollout = _bundle(cluster.rollout_cpus, cluster.rollout_gpus, cluster.rollout_resources)
        names = {f"rollout-{i}": rollout for i in range(workers)}
        specs.append(GroupSpec("rollout", cluster.rollout_strategy, names))
    if buffer and cluster.buffer_resources:  # else the buffer runs on the driver's node
        bundle = dict(cluster.buffer_resources)  # no CPU: it only supervises redis-server
        specs.append(GroupSpec("buffer", "PACK", {"buffer": bundle}))
    return specs


def bundles_for(job: JobConfig, *, trainers: int, workers: int) -> dict[str, dict[str, float]]:
    """Every bundle by name (trainer-R, rollout-I), whatever group holds it."""
    out: dict[str, dict[str, float]] = {}
    for spec in group_specs(job, trainers=trainers, workers=workers):
        out.update(spec.bundles)
    return out


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


def needed_total(specs: list[GroupSpec]) -> dict[str, float]:
    """The sum of every bundle's resources."""
    total: dict[str, float] = {}
    for spec in specs:
        for bundle in spec.bundles.values():
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
    return total


def shortfall(needed: dict[str, float], have: dict[str, float]) -> list[str]:
    """'NAME: need X, the cluster has Y' for each resource the cluster lacks in total."""
    return [
        f"{name}: need {amount:g}, the cluster has {have.get(name, 0.0):g}"
        for name, amount in sorted(needed.items())
        if have.get(name, 0.0) + 1e-9 < amount
    ]


class Placement:
    """The reserved bundles; `bundle(name)` gives actor options that pin an actor to one."""

    def __init__(
        self,
        job: JobConfig,
        *,
        trainers: int,
        workers: int,
        buffer: bool = False,
        timeout_s: float = 60.0,
    ) -> None:
        self.specs = group_specs(job, trainers=trainers, workers=workers, buffer=buffer)
        self.names = {n: b for spec in self.specs for n, b in spec.bundles.items()}
        needed = needed_total(self.specs)
        short = shortfall(needed, ray.cluster_resources())
        if short:  # no waiting can fix this (short of an autoscaler, which we do not drive)
            raise UserError(_message(short, needed, "the cluster does not have them"))
        self.groups: dict[str, PlacementGroup] = {}
        self._where: dict[str, tuple[PlacementGroup, int]] = {}
        for spec in self.specs:
            group = placement_group(list(spec.bundles.values()), strategy=spec.strategy)
            self.groups[spec.name] = group
            for index, name in enumerate(spec.bundles):
                self._where[name] = (group, index)
        self._wait(timeout_s, needed)
        log.info("placement: reserved %s", ", ".join(self.names))

    def _wait(self, timeout_s: float, needed: dict[str, float]) -> None:
        deadline = time.monotonic() + timeout_s
        for spec in self.specs:
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([self.groups[spec.name].ready()], timeout=left)
            if not ready:
                self.remove()
                nodes = "; ".join(_node_summary())
                raise UserError(
                    _message(
                        [f"group {spec.name} ({spec.strategy}) {list(spec.bundles.values())}"],
                        needed,
                        f"not placed within {timeout_s:.0f} s; the nodes have (available of "
                        f"total): {nodes}",
                    )
                )

    def bundle(self, name: str) -> dict[str, Any]:
        group, index = self._where[name]
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index
        )
        return {"scheduling_strategy": strategy}

    def node_ids(self) -> dict[str, str]:
        """Bundle name -> the Ray node id holding it."""
        out = {}
        for name, (group, index) in self._where.items():
            out[name] = placement_group_table(group)["bundles_to_node_id"][index]
        return out

    def remove(self) -> None:
        for group in self.groups.values():
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - already gone (e.g. Ray is shutting down)
                pass


def _message(what: list[str], needed: dict[str, float], why: str) -> str:
    asked = ", ".join(f"{k}={v:g}" for k, v in sorted(needed.items()))
    return (
        f"cluster: cannot reserve the job's resources ({asked}): {why}: "
        + "; ".join(what)
        + ". Lower cluster.*_cpus / *_gpus, trainer.num_ranks or rollout.num_workers, or start "
        "nodes with the custom resources named in cluster.*_resources (ray start --resources)"
    )


def _node_summary() -> list[str]:
    """'IP: CPU 1/1, trainer_node 0/1' per alive node (available of total)."""
    available = _available_by_node()
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = {k: v for k, v in node["Resources"].items() if not k.startswith("node:")}
        free = available.get(node["NodeID"], {})
        parts = [
            f"{k} {free.get(k, 0.0):g}/{v:g}"
            for k, v in sorted(total.items())
            if k not in ("memory", "object_store_memory")
        ]
        out.append(f"{node['NodeManagerAddress']}: " + ", ".join(parts))
    return out


def _available_by_node() -> dict[str, dict[str, float]]:
    try:
        from ray._private.state import state

        return state.available_resources_per_node()  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - private API; totals alone still help
        return {}


def embedded_cpus(job: JobConfig, *, trainers: int, workers: int) -> int:
    """Logical CPUs an embedded Ray needs so that every bundle fits."""
    cluster = job.cluster
    needed = trainers * cluster.trainer_cpus + workers * cluster.rollout_cpus
    return int(-(-needed // 1))


def embedded_resources(job: JobConfig, *, trainers: int, workers: int) -> dict[str, float]:
    """Custom resources an embedded Ray declares so a cluster config also runs on one node."""
    specs = group_specs(job, trainers=trainers, workers=workers, buffer=True)
    return {k: v for k, v in needed_total(specs).items() if k not in ("CPU", "GPU")}
