"""Build an `SGLangEngine` from the job config: start the servers (and the router), choose the
weight-sync path. Blocking: an SGLang server takes ~35-70 s to start on this 2-core CPU.

`launch_sglang_engine(job, model_dir, name=...)` is what `rollout.engine: sglang` runs for one
rollout worker (rollout/worker.py); `launch_engine(cfg, ...)` is the same from the
`rollout.sglang` section alone, for any number of servers.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout.routing_wire import RoutingLayout
from rollout.sglang.engine import SGLangEngine
from rollout.sglang.environment import probe
from rollout.sglang.ports import (
    PortReservation,
    listener_owned_by,
    reserve_free_port,
    reserve_port,
)
from rollout.sglang.router import SGLangRouter
from rollout.sglang.server import (
    ServerArgs,
    SGLangServer,
    SGLangServerError,
    free_port,
    serving_host,
)
from rollout.sglang.weight_sync import WeightSync, make_weight_sync
from rollout.sglang.worker import Worker

if TYPE_CHECKING:
    from configs import JobConfig
    from configs.services import SGLangConfig

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _pick_port(cfg: SGLangConfig, index: int) -> PortReservation:
    """cfg.base_port + index when free and not held by another launch; else (or when
    base_port is 0) a free port. Held until the caller releases it (rollout/sglang/ports.py)."""
    host = serving_host(cfg)
    if cfg.base_port:
        reservation = reserve_port(host, cfg.base_port + index)
        if reservation is not None:
            return reservation
        logger.warning(
            "port %d is taken or being launched on; using a free port", cfg.base_port + index
        )
    return reserve_free_port(host)


def _make_server(
    cfg: SGLangConfig, python: Path, port: int, index: int, model_path: str, run_dir: Path,
    overrides: dict,
) -> SGLangServer:  # fmt: skip
    args = ServerArgs.from_config(cfg, model_path=model_path, port=port, **overrides)
    log = run_dir / "logs" / f"sglang-worker{index}-{port}.log"
    return SGLangServer(args, python=python, log_path=log, startup_timeout=cfg.startup_timeout_s)


def _ours(server: SGLangServer) -> bool:
    """The server answering on its port is this launch's process (False: another one's)."""
    owned = listener_owned_by(server.pid or -1, server.args.port)
    if owned is None:  # cannot tell here (no /proc, or another network namespace)
        logger.debug("%s: cannot check which process listens; trusting /health", server.url)
    return owned is not False


def start_servers(
    cfg: SGLangConfig,
    *,
    model_path: str | Path,
    run_dir: Path,
    count: int = 1,
    first_index: int = 0,
    retries: int = 2,
    **overrides: Any,
) -> list[SGLangServer]:
    """Start `count` servers at once, then wait until all are healthy (all stopped on error).

    Each port stays reserved until its server answers and is checked to be ours; a server
    whose port another process answers on is stopped and started again on a fresh port
    (`retries` times)."""
    env = probe(cfg.python)
    logger.info("sglang environment: %s", env.describe())
    indices = range(first_index, first_index + count)
    held = [_pick_port(cfg, index) for index in indices]
    servers = [
        _make_server(cfg, env.python, r.port, i, str(model_path), run_dir, overrides)
        for r, i in zip(held, indices)
    ]
    try:
        for server in servers:
            server.start()
        for slot, index in enumerate(indices):
            servers[slot].startup_seconds = servers[slot].wait_healthy()
            for attempt in range(retries + 1):
                if _ours(servers[slot]):
                    break
                other = servers[slot].url
                servers[slot].stop()
                if attempt == retries:
                    raise SGLangServerError(f"{other}: another process answers on this port")
                logger.warning("%s: another process answers on this port; new port", other)
                held[slot].release()
                held[slot] = reserve_free_port(serving_host(cfg))
                port = held[slot].port
                servers[slot] = _make_server(
                    cfg, env.python, port, index, str(model_path), run_dir, overrides
                )
                servers[slot].startup_seconds = servers[slot].launch()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    finally:
        for reservation in held:
            reservation.release()
    return servers


def start_router(
    cfg: SGLangConfig, servers: list[SGLangServer], *, run_dir: Path, timeout: float
) -> SGLangRouter:
    host = serving_host(cfg)
    port = cfg.router_port or free_port(host)
    router = SGLangRouter(
        host=host,
        port=port,
        policy=cfg.router_policy,
        log_path=run_dir / "logs" / f"sglang-router-{port}.log",
        request_timeout_s=timeout,
        api_key=cfg.api_key,  # without it the router would serve anyone with the workers' key
    )
    router.start()
    try:
        for server in servers:
            router.add_worker(server.url, api_key=cfg.api_key)
    except BaseException:
        router.stop()
        raise
    return router


def sync_from_config(cfg: SGLangConfig, run_dir: Path) -> WeightSync:
    """The weight-sync path `cfg.weight_sync` names."""
    options: dict[str, dict[str, Any]] = {
        "tensor": {},
        "distributed": {"backend": cfg.weight_sync_backend, "master_address": serving_host(cfg)},
        "disk": {"staging_dir": run_dir / "weights"},
    }
    return make_weight_sync(cfg.weight_sync, **options[cfg.weight_sync])


def launch_engine(
    cfg: SGLangConfig,
    *,
    model_path: str | Path,
    run_dir: str | Path,
    num_servers: int = 1,
    first_index: int = 0,
    request_timeout: float = 120.0,
    **overrides: Any,
) -> SGLangEngine:
    """Servers (+ the router when `cfg.router` and there is more than one server) -> engine."""
    run_dir = Path(run_dir)
    servers = start_servers(
        cfg,
        model_path=model_path,
        run_dir=run_dir,
        count=num_servers,
        first_index=first_index,
        **overrides,
    )
    router = None
    try:
        if cfg.router and num_servers > 1:
            router = start_router(cfg, servers, run_dir=run_dir, timeout=request_timeout)
        sync = sync_from_config(cfg, run_dir)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    workers = [Worker.for_server(s, timeout=request_timeout) for s in servers]
    return SGLangEngine(workers, weight_sync=sync, router=router, request_timeout=request_timeout)


def launch_sglang_engine(
    job: JobConfig, model_dir: str | Path, *, name: str, tokenizer_dir: str | Path | None = None
) -> SGLangEngine:
    """One SGLang server for the rollout worker `name` ("...-<index>" picks base_port+index).

    The KV pool defaults to rollout.max_running x rollout.max_context tokens on a CPU and the
    context length to rollout.max_context. Without tokenizer files in `model_dir` (and no
    `tokenizer_dir`) the server runs with --skip-tokenizer-init: ids in, ids out, which is all
    the rollout functions use (stop strings then do not apply).
    """
    cfg, rollout = job.rollout.sglang, job.rollout
    match = re.search(r"(\d+)$", name)
    index = int(match.group(1)) if match else 0
    overrides: dict[str, Any] = {
        "context_length": cfg.context_length or rollout.max_context,
        "random_seed": job.seed,
    }
    if cfg.max_total_tokens is not None:
        overrides["max_total_tokens"] = cfg.max_total_tokens
    elif cfg.cpu:
        overrides["max_total_tokens"] = rollout.max_running * rollout.max_context
    extra = list(cfg.extra_args)
    if tokenizer_dir is not None:
        overrides["tokenizer_path"] = str(tokenizer_dir)
    elif not any((Path(model_dir) / f).exists() for f in _TOKENIZER_FILES):
        extra.append("--skip-tokenizer-init")
    if "--skip-tokenizer-init" not in extra and "--tool-call-parser" not in extra:
        # its /v1/chat/completions turns GLM-4.5/4.6 tool-call text into OpenAI tool_calls
        extra += ["--tool-call-parser", "glm45"]
    r3 = job.algorithm.moe.routing_replay == "rollout"  # configs/job.py: GPU servers only
    if r3:
        extra.append("--enable-return-routed-experts")
    overrides["extra_args"] = extra
    engine = launch_engine(
        cfg,
        model_path=model_dir,
        run_dir=job.resolved_run_dir,
        first_index=index,
        request_timeout=rollout.request_timeout_s,
        **overrides,
    )
    if r3:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        engine.set_routing(RoutingLayout.of(config))
    return engine
