"""One Ray placement group for the job: a bundle per trainer rank and per rollout worker.

Reserving everything up front means a job either gets all its resources or fails at start
with a message saying what it asked for, instead of hanging half-started.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs import JobConfig
from physarum.errors import UserError

log = logging.getLogger(__name__)


def bundles_for(job: JobConfig, *, trainers: int, workers: int) -> dict[str, dict[str, float]]:
    cluster = job.cluster
    out: dict[str, dict[str, float]] = {}
    for rank in range(trainers):
        out[f"trainer-{rank}"] = _bundle(cluster.trainer_cpus, cluster.trainer_gpus)
    for index in range(workers):
        out[f"rollout-{index}"] = _bundle(cluster.rollout_cpus, cluster.rollout_gpus)
    return out


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


class Placement:
    """The reserved bundles; `bundle(name)` gives actor options that pin an actor to one."""

    def __init__(
        self, job: JobConfig, *, trainers: int, workers: int, timeout_s: float = 60.0
    ) -> None:
        self.names = bundles_for(job, trainers=trainers, workers=workers)
        specs = list(self.names.values())
        self.index = {name: i for i, name in enumerate(self.names)}
        self.group = placement_group(specs, strategy=job.cluster.placement_strategy)
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(self.group)
            have = ray.cluster_resources()
            raise UserError(
                f"cluster: cannot reserve {len(specs)} bundles {specs} within {timeout_s:.0f} s; "
                f"the cluster has CPU={have.get('CPU', 0)}, GPU={have.get('GPU', 0)} "
                "(lower cluster.*_cpus / *_gpus, trainer.num_ranks or rollout.num_workers)"
            )
        log.info("placement: reserved %s", ", ".join(self.names))

    def bundle(self, name: str) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.index[name]
        )
        return {"scheduling_strategy": strategy}

    def remove(self) -> None:
        remove_placement_group(self.group)


def embedded_cpus(job: JobConfig, *, trainers: int, workers: int) -> int:
    """Logical CPUs an embedded Ray needs so that every bundle fits."""
    cluster = job.cluster
    needed = trainers * cluster.trainer_cpus + workers * cluster.rollout_cpus
    return int(-(-needed // 1))
