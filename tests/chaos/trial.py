"""One chaos trial: run the toy RL job, SIGKILL one of its processes at a seeded point,
let it recover (by itself, or by `physarum run --resume DIR` after it exits non-zero), then
check the invariants from the buffer's and the checkpoint's own records (physarum/audit.py).

Targets: a rollout worker, the trainer actor, the job's redis-server, the driver. A plan
kills a sequence of targets (e.g. the same one twice in a row): each kill after the first
waits until the recovering job (the same job, or its resume) has logged a new step. Every process of
a trial carries a unique token in its environment (`PHYSARUM_CHAOS_TRIAL`, inherited by Ray's
processes and the redis-server): targets are found in placement.json / the redis pid file and
checked against the token, and at the end whatever still carries it is killed by pid. No
other job's process is ever touched.

Used by tests/chaos (a short seeded set) and bench/chaos.py (the long campaign).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from physarum.audit import AuditReport, BufferSnapshot, audit_run, read_buffer, read_lineage
from trainer.trained_log import TrainedGroup

TOKEN_VAR = "PHYSARUM_CHAOS_TRIAL"
TARGETS = ("rollout", "trainer", "redis", "driver")
NONE = "none"  # a plan without kills: the reference, the same job uninterrupted
STEPS = 10
REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "model.preset=glm4moe-tiny",
    "data.n_train=24",  # 6 steps an epoch: trials cross epoch boundaries
    "data.n_eval=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.prompts_per_lease=4",
    "rollout.max_running=32",
    "rollout.lease_seconds=5",  # a dead worker's prompts come back within the trial
    "rollout.eval.interval=0",
    "rollout.eval.n_prompts=4",
    "rollout.eval.k=1",
    "rollout.eval.temperature=0.0",
    "trainer.prompts_per_step=4",
    f"trainer.steps={STEPS}",
    "trainer.micro_batch_tokens=512",
    "checkpoint.interval=2",
    "checkpoint.keep_last=2",
    "checkpoint.save_hf=false",
]


@dataclass(frozen=True)
class TrialPlan:
    """Kill `targets` in turn: the first once step `after_step` is logged and `delay_s` more
    passed, each next one `delay_s` after the recovering job logged a new step. () = none."""

    index: int
    targets: tuple[str, ...]
    after_step: int
    delay_s: float

    @property
    def name(self) -> str:
        if not self.targets:
            return NONE
        if len(set(self.targets)) == 1 and len(self.targets) > 1:
            return f"{self.targets[0]} x{len(self.targets)}"
        return "+".join(self.targets)


def plan_trials(n: int, seed: int) -> list[TrialPlan]:
    """n trials; the seeded RNG picks each one's target (each of the four once, or one of
    them twice in a row: 8 kinds, equally likely), step and delay."""
    rng = random.Random(seed)
    kinds = [(t,) for t in TARGETS] + [(t, t) for t in TARGETS]
    return [
        TrialPlan(i, rng.choice(kinds), rng.randint(1, STEPS - 4), round(rng.uniform(0, 1.5), 2))
        for i in range(n)
    ]


@dataclass
class TrialResult:
    plan: TrialPlan
    outcome: str = "failed"  # recovered (no resume needed) | resumed | failed
    kills: list[str] = field(default_factory=list)  # "target pid at step s"
    exits: list[int] = field(default_factory=list)  # exit status of each job run
    report: AuditReport | None = None
    completed: bool = False  # the last step's checkpoint is COMPLETE
    leftovers: int = 0  # processes of the trial still running after its job ended
    error: str = ""
    seconds: float = 0.0
    buffer: BufferSnapshot | None = None
    lineage: list[TrainedGroup] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.completed
            and self.report is not None
            and self.report.ok
            and not self.leftovers
            and not self.error
        )


# ---- processes of one trial ------------------------------------------------------------


def _belongs(proc: psutil.Process, token: str, run_dir: Path) -> bool:
    """A process of this trial: it carries the token, or it is the redis-server serving the
    trial's run dir (redis-server overwrites its environment with its process title, so its
    working directory, the data dir, identifies it)."""
    with contextlib.suppress(psutil.Error, OSError):
        if proc.name() == "redis-server":
            return Path(proc.cwd()).resolve() == (run_dir / "redis").resolve()
        return proc.environ().get(TOKEN_VAR) == token
    return False


def trial_processes(token: str, run_dir: Path) -> list[psutil.Process]:
    """Every live process of this user that belongs to the trial."""
    me = os.getuid()
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["uids"] and proc.info["uids"].real != me:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if _belongs(proc, token, run_dir):
                found.append(proc)
    return found


def _kill_verified(pid: int, token: str, run_dir: Path) -> bool:
    """SIGKILL pid only if it is a process of this trial."""
    with contextlib.suppress(psutil.Error):
        if _belongs(psutil.Process(pid), token, run_dir):
            os.kill(pid, signal.SIGKILL)
            return True
    return False


def _placement_pid(run_dir: Path, role: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        rows = json.loads((run_dir / "placement.json").read_text())
        return next((int(r["pid"]) for r in rows if r["role"] == role), None)
    return None


def _actor_pid(token: str, run_dir: Path, actor_class: str) -> int | None:
    """The live process whose Ray title names `actor_class` (a restarted worker's new pid)."""
    for proc in trial_processes(token, run_dir):
        with contextlib.suppress(psutil.Error):
            if any(actor_class in part for part in proc.cmdline()):
                return proc.pid
    return None


def find_target(target: str, run_dir: Path, token: str, driver: subprocess.Popen) -> int | None:
    if target == "driver":
        return driver.pid
    if target == "redis":
        with contextlib.suppress(OSError, ValueError):
            return int((run_dir / "redis" / "redis.pid").read_text().strip())
        return None
    role, actor = {"rollout": ("rollout", "RolloutActor"), "trainer": ("trainer", "TrainerActor")}[
        target
    ]
    pid = _placement_pid(run_dir, role)
    alive = (
        pid is not None and psutil.pid_exists(pid) and _belongs(psutil.Process(pid), token, run_dir)
    )
    return pid if alive else _actor_pid(token, run_dir, actor)


def _train_lines(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    with contextlib.suppress(OSError):
        return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"reward"' in x]
    return []


def _cleanup(token: str, run_dir: Path, grace_s: float) -> int:
    """Wait up to grace_s for the trial's processes to end, then SIGKILL the rest by pid.
    Returns how many had to be killed."""
    deadline = time.monotonic() + grace_s
    left = trial_processes(token, run_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = trial_processes(token, run_dir)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=20)
    return len(left)


# ---- the trial -------------------------------------------------------------------------


def _start(
    run_dir: Path, env: dict[str, str], log: Path, resume: bool, pace_s: float
) -> subprocess.Popen:
    if resume:
        args = ["run", "--resume", str(run_dir)]
    else:
        overrides = [f"run_dir={run_dir}", *OVERRIDES]
        if pace_s > 0:  # tests/chaos/pace.py: each episode's reward takes pace_s
            paced = f"{{name: 'tests.chaos.pace:pace', weight: 0.0, args: {{seconds: {pace_s}}}}}"
            overrides.append(f"reward.plugins=[{{name: arithmetic}}, {paced}]")
        sets = [x for o in overrides for x in ("--set", o)]
        args = ["run", "configs/toy_grpo.yaml", *sets]
    with log.open("a") as out:
        out.write(f"\n=== physarum {' '.join(args)}\n")
        out.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "physarum.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(cond, proc: subprocess.Popen, deadline: float) -> bool:
    """Poll cond() until true; False if the job ended first or the deadline passed."""
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_trial(
    plan: TrialPlan,
    root: Path,
    *,
    reference: BufferSnapshot | None = None,
    job_timeout_s: float = 300,
    max_resumes: int = 3,
    pace_s: float = 0.0,
) -> TrialResult:
    """Run one trial in root/trial_N; never raises for a failure of the job under test.
    reference: the buffer of an uninterrupted run with the same seed, whose epoch orders the
    trial's data order must follow (None: the seeded order of the trial's own dataset).
    pace_s: seconds each episode's reward takes (tests/chaos/pace.py), so that a fast
    machine cannot finish the job before a kill planned in it."""
    started = time.monotonic()
    result = TrialResult(plan)
    run_dir = root / f"trial_{plan.index}"
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", TOKEN_VAR: token}
    log = root / f"trial_{plan.index}.log"
    kills_left = len(plan.targets)
    killed: set[int] = set()
    try:
        for attempt in range(max_resumes + 1):
            proc = _start(run_dir, env, log, resume=attempt > 0, pace_s=pace_s)
            deadline = time.monotonic() + job_timeout_s
            while kills_left and proc.poll() is None:
                seen = len(_train_lines(run_dir))
                target = plan.targets[len(result.kills)]

                def ready(seen: int = seen, target: str = target, job: Any = proc) -> bool:
                    """The first kill after its step; a repeat once the recovering job
                    trained a step and the target is up again (a replaced worker)."""
                    if not result.kills:
                        return max(_train_lines(run_dir), default=0) >= plan.after_step
                    if len(_train_lines(run_dir)) <= seen:
                        return False
                    pid = find_target(target, run_dir, token, job)
                    return pid is not None and pid not in killed

                if not _wait_for(ready, proc, deadline):
                    break
                time.sleep(plan.delay_s)
                pid = find_target(target, run_dir, token, proc)
                step = max(_train_lines(run_dir), default=0)
                if pid is None or not _kill_verified(pid, token, run_dir):
                    result.error = f"{target}: no live process to kill at step {step}"
                    break
                result.kills.append(f"{target} pid {pid} at step {step}")
                killed.add(pid)
                kills_left -= 1
                if target in ("driver", "trainer", "redis"):
                    break  # this job run is over (or fails); the next kill is in the resume
            try:
                result.exits.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                result.exits.append(proc.wait())
                result.error = f"job run {attempt} did not end in {job_timeout_s:.0f} s"
                break
            if result.exits[-1] == 0:
                break
            # a killed driver leaves its redis-server (own session): the resume stops it
            result.leftovers += _settle(token, run_dir, grace_s=30)
        result.leftovers += _cleanup(token, run_dir, grace_s=15)
        complete = run_dir / "checkpoints" / f"step_{STEPS}" / "COMPLETE"
        result.completed = complete.exists() and result.exits[-1] == 0
        if result.completed and not result.error:
            result.outcome = "recovered" if len(result.exits) == 1 else "resumed"
        if result.completed and kills_left:
            result.error = result.error or "the job ended before every kill was made"
        if complete.exists():
            result.report = audit_run(run_dir, reference and reference.reference_order)
            result.buffer = read_buffer(run_dir)
            result.lineage = read_lineage(run_dir)
    except Exception as exc:  # noqa: BLE001 - a trial reports, the caller decides
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        _cleanup(token, run_dir, grace_s=0)
        result.seconds = time.monotonic() - started
    return result


def _settle(token: str, run_dir: Path, grace_s: float) -> int:
    """After a job run failed: its Ray processes must go (they die with the driver); wait for
    them, then kill stragglers by pid and count them. redis-server may stay for the resume
    (a driver killed with SIGKILL cannot stop it; the resumed job does)."""
    deadline = time.monotonic() + grace_s
    left = [p for p in trial_processes(token, run_dir) if not _is_redis(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p for p in trial_processes(token, run_dir) if not _is_redis(p)]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=20)
    return len(left)


def _is_redis(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.name() == "redis-server"
    return False
