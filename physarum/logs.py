"""Each service's own log: run_dir/logs/<service>.log (trainer-0, rollout-1, buffer), rotated.

An actor calls `setup_service_logging` first thing in its constructor, in its own process
and on its own node: the run dir is absolute and on storage every node mounts (DESIGN.md,
Multi-node), so the files of a whole cluster job end up side by side. The driver does not
forward the actors' stdout/stderr to its console (ray.init(log_to_driver=False)) unless
--verbose; a service that fails still reaches the console through the error Ray raises in
the driver, and `explain_service_error` adds which service it was and where its log is.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from physarum.console import strip_ansi

MAX_BYTES = 10 * 2**20  # per file; the 300-step toy GRPO writes ~40 KB (rollout-0)
BACKUPS = 3  # <service>.log.1 … .3 kept after rotation

# How Ray names the actor in an error raised in the driver: a task's error starts its traceback
# with "ray::TrainerActor.rl_step() (pid=12, ip=10.0.0.2, …)"; a dead actor's says
# "class_name: RolloutActor … pid: 12 … ip: 10.0.0.3".
_TASK_ERROR = re.compile(r"ray::(\w+)\.\w+\(\) \(pid=(\d+), ip=([\w.:]+)")
_ACTOR_DIED = re.compile(r"class_name: (\w+)\s+actor_id: \w+\s+pid: (\d+)(?:.|\n)*?ip: ([\w.:]+)")
_ROLES = {"TrainerActor": "trainer", "RolloutActor": "rollout", "BufferActor": "buffer"}


def logs_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs"


def service_log(run_dir: str | Path, service: str) -> Path:
    """trainer-0 -> run_dir/logs/trainer-0.log."""
    return logs_dir(run_dir) / f"{service}.log"


class ServiceFileHandler(RotatingFileHandler):
    """The rotated file of one service; a marker class so set-up can replace its own."""


def setup_service_logging(run_dir: str | Path, service: str, level: str = "INFO") -> Path:
    """Send this process's logging to run_dir/logs/<service>.log, each line tagged with the
    service, pid and node IP, and to stderr (Ray's worker log, shown with --verbose).

    run_dir must be absolute (actors run in the cwd of `ray start`). Returns the log path."""
    import ray

    path = service_log(run_dir, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    fmt = logging.Formatter(
        f"%(asctime)s %(levelname).1s [{service} pid=%(process)d ip={ip}] %(name)s: %(message)s"
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ServiceFileHandler)]:
        root.removeHandler(old)
        old.close()
    handler = ServiceFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(fmt)
        root.addHandler(stderr)
    root.setLevel(level)
    return path


def _placement_rows(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "placement.json").read_text())
    except (OSError, ValueError):
        return []


def failed_service(exc: BaseException, run_dir: str | Path) -> tuple[str, Path] | None:
    """The service an actor error raised in the driver came from, and its log file.

    Ray's message names the actor class, pid and IP; placement.json maps a pid to the
    service's rank. None when `exc` is not an actor's error."""
    text = strip_ansi(str(exc))
    match = _TASK_ERROR.search(text) or _ACTOR_DIED.search(text)
    if match is None or match.group(1) not in _ROLES:
        return None
    role, pid = _ROLES[match.group(1)], int(match.group(2))
    if role == "buffer":
        return "buffer", service_log(run_dir, "buffer")
    for row in _placement_rows(Path(run_dir)):
        if row.get("role") == role and row.get("pid") == pid:
            service = f"{role}-{row['rank']}"
            return service, service_log(run_dir, service)
    # a replacement worker started after placement.json was written: name the role's logs
    return f"{role} (pid {pid}, {match.group(3)})", logs_dir(run_dir) / f"{role}-*.log"


def explain_service_error(exc: BaseException, run_dir: str | Path) -> str | None:
    """One console line for a failed service: its name and its log file; None if `exc`
    does not come from a service."""
    found = failed_service(exc, run_dir)
    if found is None:
        return None
    service, path = found
    return f"service {service} failed; its log: {path}"


def report_service_error(exc: BaseException, run_dir: str | Path) -> None:
    """Name the failed service and its log on the console (and in the traceback's notes)."""
    line = explain_service_error(exc, run_dir)
    if line is not None:
        logging.getLogger("physarum").error(line)
        exc.add_note(line)
