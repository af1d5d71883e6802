"""Connecting to Ray: an embedded Ray on a laptop, or an existing cluster when one is named.

Order: `cluster.address` in the config, then RAY_ADDRESS (set by `ray job submit` inside a
job), otherwise a private embedded Ray sized by `cluster.num_cpus`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import ray

from configs import ClusterConfig
from physarum.console import is_verbose

log = logging.getLogger(__name__)


@dataclass
class RayHandle:
    embedded: bool
    address: str | None
    owned: bool = True  # this handle initialised Ray, so it shuts it down

    def shutdown(self) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()


def connect(
    cfg: ClusterConfig,
    *,
    min_cpus: int = 1,
    resources: dict[str, float] | None = None,
    working_dir_env: dict[str, str] | None = None,
) -> RayHandle:
    """Initialise Ray for this process; an already initialised Ray is reused (not owned).

    resources: custom resources an embedded Ray declares (the job's cluster.*_resources),
    so a config written for a cluster also runs on one machine."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return RayHandle(embedded=False, address=address, owned=False)
    runtime_env = {"env_vars": dict(working_dir_env or {})}
    # The actors log to run_dir/logs/<service>.log (physarum.logs); their stdout/stderr
    # reaches this console only with --verbose, and then without colour codes in a pipe.
    log_to_driver = is_verbose()
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address:
        log.info("joining the Ray cluster at %s (namespace %s)", address, cfg.namespace)
        ray.init(
            address=address,
            namespace=cfg.namespace,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
        )
        return RayHandle(embedded=False, address=address)
    # Logical CPUs: at least what the job's bundles reserve, even on a 2-core laptop.
    num_cpus = max(cfg.num_cpus or os.cpu_count() or 1, min_cpus)
    # Ray starts workers at niceness 15; on a shared laptop our trainer and rollout would
    # then get only the CPU everything else leaves over.
    os.environ.setdefault("RAY_worker_niceness", "0")
    log.info("starting an embedded Ray with %d CPUs", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        resources=dict(resources or {}),
        namespace=cfg.namespace,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=log_to_driver,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return RayHandle(embedded=True, address=None)


def actor_options(cpus: float, gpus: float, *, threads: int) -> dict:
    """Ray actor options: resources plus the thread caps a small machine needs."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}}
