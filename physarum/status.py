"""`physarum status RUN_DIR`: what a running or finished job is doing, from its run dir alone.

Everything comes from files the job writes (job.yaml, metrics.jsonl, placement.json,
checkpoints/, logs/, dashboard.json), so it works from any machine that mounts the run dir and
needs neither Ray nor the job's Redis. A job is finished once its final model is saved;
before that, whether its driver still runs is known only on the driver's own machine (its
pid, started before placement.json was written); elsewhere the state says so.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from physarum.logs import logs_dir, service_log
from physarum.metrics import read_metrics
from physarum.progress import FIELDS, format_duration, format_value
from physarum.rundir import RunDir

BUFFER_KEYS = (
    ("buffer/prompts_queued", "prompts queued"),
    ("buffer/groups_pending", "groups leased to the trainer"),
    ("buffer/groups_unconsumed", "groups waiting"),
    ("buffer/staleness_mean", "staleness mean"),
    ("buffer/staleness_max", "staleness max"),
    ("buffer/drops_stale", "dropped as stale"),
    ("buffer/lease_expiries", "leases expired"),
    ("buffer/late_pushes", "late pushes"),
    ("buffer/epoch", "epoch"),
)


@dataclass
class Status:
    run_dir: str
    name: str
    mode: str
    state: str  # running | finished | stopped | unknown (driver on another machine)
    detail: str
    step: int | None
    total_steps: int | None
    last_update_s: float | None  # seconds since the last metrics record
    metrics: dict[str, float] = field(default_factory=dict)
    buffer: dict[str, float] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    final_model: str | None = None
    dashboard_url: str | None = None


def total_steps(job: Any) -> int:
    if job.mode == "rejection_sampling":
        return job.algorithm.rejection_sampling.rounds
    if job.mode == "eval":
        return 1
    return job.trainer.steps


def _driver_alive(row: dict[str, Any] | None, written: float) -> bool | None:
    """True/False for a driver on this machine (a pid reused after the driver ended started
    later than placement.json); None when the driver ran on another machine."""
    if row is None:
        return False
    import psutil

    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    if row.get("node_ip") not in local | {"127.0.0.1"}:
        return None
    try:
        proc = psutil.Process(int(row["pid"]))
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= written + 1
    except (psutil.Error, KeyError, ValueError):
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dashboard_url(run_dir: Path) -> str | None:
    """dashboard.json is written by a live dashboard and removed when it stops; a leftover
    (the driver was killed) is ignored when its pid is gone."""
    info = _read_json(run_dir / "dashboard.json")
    if not isinstance(info, dict) or "url" not in info:
        return None
    pid = info.get("pid")
    if isinstance(pid, int) and not Path(f"/proc/{pid}").exists():
        return None
    return str(info["url"])


def _services(run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        service = f"{row['role']}-{row['rank']}" if row["role"] != "buffer" else "buffer"
        log = service_log(run_dir, service)
        out.append(
            {
                "service": service,
                "node_ip": row.get("node_ip"),
                "pid": row.get("pid"),
                "device": row.get("device"),
                "gpu_ids": row.get("gpu_ids", []),
                "log": str(log) if log.exists() else None,
            }
        )
    return out


def read_status(run_dir: Path) -> Status:
    """The status of the job in `run_dir` (raises FileNotFoundError if it is not a run dir)."""
    run = RunDir(run_dir.absolute())
    job = run.load_job()
    records = read_metrics(run.metrics)
    last: dict[str, Any] = {}
    for record in records:
        last.update({k: v for k, v in record.items() if isinstance(v, int | float)})
    step = int(records[-1]["step"]) if records else None
    total = total_steps(job)
    placement = run.root / "placement.json"
    rows = _read_json(placement) or []
    driver = next((r for r in rows if r.get("role") == "driver"), None)
    alive = _driver_alive(driver, placement.stat().st_mtime) if rows else False
    checkpoint = run.latest_checkpoint()
    final = run.hf if (run.hf / "config.json").exists() else None
    state, detail = _state(alive, driver, final is not None, step, total, run)
    return Status(
        run_dir=str(run.root),
        name=job.name,
        mode=job.mode,
        state=state,
        detail=detail,
        step=step,
        total_steps=total,
        last_update_s=time.time() - records[-1]["time"] if records else None,
        metrics={k: last[k] for k, _ in FIELDS if k in last},
        buffer={k: last[k] for k, _ in BUFFER_KEYS if k in last},
        services=_services(run.root, rows),
        checkpoint=str(checkpoint[1]) if checkpoint else None,
        final_model=str(final) if final else None,
        dashboard_url=_dashboard_url(run.root),
    )


def _state(
    alive: bool | None,
    driver: dict[str, Any] | None,
    finished: bool,
    step: int | None,
    total: int,
    run: RunDir,
) -> tuple[str, str]:
    if finished:  # the final model is the job's last act (its driver may live on: the demo)
        return "finished", f"final model in {run.hf}"
    if alive:
        return "running", f"driver pid {driver['pid']} on {driver['node_ip']}"  # type: ignore[index]
    if alive is None:
        assert driver is not None
        return "unknown", f"the driver ran on {driver['node_ip']}; ask there (pid {driver['pid']})"
    if step is None:
        return "stopped", "no step logged yet and no driver running"
    return "stopped", f"not running; continue with: physarum run --resume {run.root}"


def render(status: Status) -> str:
    """Human-readable lines, one fact per line."""
    progress = (
        "no metrics yet" if status.step is None else f"step {status.step}/{status.total_steps}"
    )
    if status.last_update_s is not None:
        progress += f" (last record {format_duration(status.last_update_s)} ago)"
    labels = dict(FIELDS)
    lines = [
        f"run        {status.run_dir}  ({status.name}, {status.mode})",
        f"state      {status.state}: {status.detail}",
        f"progress   {progress}",
    ]
    if status.metrics:
        text = " | ".join(f"{labels[k]} {format_value(v)}" for k, v in status.metrics.items())
        lines.append(f"metrics    {text}")
    if status.buffer:
        names = dict(BUFFER_KEYS)
        text = ", ".join(f"{names[k]} {_count(v)}" for k, v in status.buffer.items())
        lines.append(f"buffer     {text}")
    lines.append(f"checkpoint {status.checkpoint or 'none yet'}")
    if status.final_model:
        lines.append(f"model      {status.final_model}")
    lines.append(f"dashboard  {status.dashboard_url or 'not live'}")
    if status.services:
        lines.append("services   (placement.json)")
        for s in status.services:
            gpus = f" gpus {','.join(s['gpu_ids'])}" if s["gpu_ids"] else ""
            log = f"  log {s['log']}" if s["log"] else ""
            where = f"{s['node_ip']:<15} pid {s['pid']:<8} {s['device']}{gpus}"
            lines.append(f"  {s['service']:<11} {where}{log}")
    else:
        lines.append("services   none placed yet (no placement.json)")
    lines.append(f"logs       {logs_dir(status.run_dir)}{os.sep}")
    return "\n".join(lines)


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else format_value(value)


def print_status(run_dir: Path, *, as_json: bool = False) -> int:
    status = read_status(run_dir)
    print(json.dumps(asdict(status), indent=1) if as_json else render(status))
    return 0
