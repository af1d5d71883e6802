"""`physarum plan --placement CONFIG --nodes N --gpus-per-node G`: which node gets which
trainer rank and rollout engine, before a cluster is booked.

The same rules as the job's placement groups (physarum/services/placement.py): the ranks of
one trainer tensor-parallel group share a node (STRICT_PACK); rollout engines follow
`cluster.rollout_strategy` (PACK fills a node before the next, SPREAD deals them round
robin). Nodes are assumed identical and empty; first fit, trainer groups first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from configs import JobConfig
from physarum.errors import UserError


def trainer_tp(job: JobConfig) -> int:
    """Ranks that must share a node: megatron's tensor-parallel size, 1 for torch."""
    return job.trainer.megatron.tp if job.trainer.backend == "megatron" else 1


@dataclass
class Node:
    index: int
    gpus: float
    used: float = 0.0
    trainer_ranks: list[int] = field(default_factory=list)
    engines: list[int] = field(default_factory=list)

    @property
    def free(self) -> float:
        return self.gpus - self.used


def plan_placement(job: JobConfig, nodes: int, gpus_per_node: int) -> list[Node]:
    """Assign every trainer rank and rollout engine to a node; UserError when a TP group
    would span nodes or the GPUs do not add up."""
    if nodes < 1 or gpus_per_node < 0:
        raise UserError(
            f"plan: --nodes must be >= 1 and --gpus-per-node >= 0 (got {nodes}, {gpus_per_node})"
        )
    cluster, ranks = job.cluster, job.trainer.num_ranks
    tp, per_rank, per_engine = trainer_tp(job), cluster.trainer_gpus, cluster.rollout_gpus
    engines = job.rollout.num_workers if job.mode != "sft" else 1
    if job.rollout.engine == "sglang" and per_engine and per_engine < job.rollout.sglang.tp:
        raise UserError(
            f"cluster.rollout_gpus: an SGLang engine with rollout.sglang.tp="
            f"{job.rollout.sglang.tp} needs that many GPUs, got {per_engine:g}"
        )
    if tp * per_rank > gpus_per_node:
        raise UserError(
            f"plan: a trainer TP group ({tp} ranks x {per_rank:g} GPUs = {tp * per_rank:g}) "
            f"would span nodes of {gpus_per_node} GPUs; lower trainer.megatron.tp or use "
            "bigger nodes"
        )
    needed = ranks * per_rank + engines * per_engine
    if needed > nodes * gpus_per_node:
        raise UserError(
            f"plan: the job needs {needed:g} GPUs (trainer {ranks} x {per_rank:g}, rollout "
            f"{engines} x {per_engine:g}) but {nodes} nodes x {gpus_per_node} GPUs have "
            f"{nodes * gpus_per_node}"
        )
    out = [Node(i, float(gpus_per_node)) for i in range(nodes)]
    for first in range(0, ranks, tp):
        group = list(range(first, min(first + tp, ranks)))
        node = _first_fit(out, len(group) * per_rank)
        if node is None:
            raise UserError(
                f"plan: trainer TP group {first // tp} (ranks {group[0]}-{group[-1]}) fits on "
                f"no node whole (free GPUs per node: {[n.free for n in out]}); it would span nodes"
            )
        node.trainer_ranks += group
        node.used += len(group) * per_rank
    spread = cluster.rollout_strategy in ("SPREAD", "STRICT_SPREAD")
    for engine in range(engines):
        node = _least_loaded(out, per_engine) if spread else _first_fit(out, per_engine)
        if node is None:
            raise UserError(
                f"plan: rollout engine {engine} ({per_engine:g} GPUs) fits on no node "
                f"(free GPUs per node: {[n.free for n in out]})"
            )
        node.engines.append(engine)
        node.used += per_engine
    return out


def _first_fit(nodes: list[Node], gpus: float) -> Node | None:
    return next((n for n in nodes if n.free + 1e-9 >= gpus), None)


def _least_loaded(nodes: list[Node], gpus: float) -> Node | None:
    fits = [n for n in nodes if n.free + 1e-9 >= gpus]
    return min(fits, key=lambda n: (len(n.trainer_ranks) + len(n.engines), n.index), default=None)


def render(job: JobConfig, plan: list[Node]) -> str:
    cluster = job.cluster
    lines = [
        f"{job.name}: {len(plan)} node(s) x {plan[0].gpus:g} GPUs; trainer "
        f"{job.trainer.num_ranks} rank(s) x {cluster.trainer_gpus:g} GPU (TP {trainer_tp(job)}, "
        f"STRICT_PACK), rollout engines x {cluster.rollout_gpus:g} GPU "
        f"({cluster.rollout_strategy})",
    ]
    for role in ("trainer", "rollout", "buffer"):
        extra = getattr(cluster, f"{role}_resources")
        if extra:
            lines.append(f"  {role} bundles also need {extra}")
    for node in plan:
        parts = []
        if node.trainer_ranks:
            parts.append(f"trainer ranks {_span(node.trainer_ranks)}")
        if node.engines:
            parts.append(f"rollout engines {_span(node.engines)}")
        lines.append(
            f"node {node.index}: {', '.join(parts) or '(idle)'}  [{node.used:g}/{node.gpus:g} GPUs]"
        )
    return "\n".join(lines)


def _span(items: list[int]) -> str:
    """'3', '0-7' (a contiguous run) or '0, 2, 5'."""
    if len(items) > 1 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ", ".join(str(i) for i in items)
