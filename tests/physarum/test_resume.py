"""`physarum run --resume RUN_DIR` after the driver was killed with SIGKILL mid-run.

The job continues from its last checkpoint, with the buffer (the embedded redis-server's AOF)
and the prompt cursor intact: the steps after the checkpoint are trained again from the
groups that were never acknowledged, and the job ends at the configured step and version.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.physarum.test_job import TINY

STEPS = 30  # a tiny step takes ~70 ms: enough steps that the kill always lands mid-run


def _physarum(*args: str) -> list[str]:
    return [sys.executable, "-m", "physarum.cli", *args]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"reward"' in x]


def _kill_all_but_redis(proc: subprocess.Popen) -> int:
    """SIGKILL the driver and every process it started but redis-server, at once, and wait
    until all are gone. Returns the pid of the surviving redis-server.

    Killing only the driver's session is not enough: Ray's workers (the trainer among them)
    run in their own process groups, can outlive the driver for a moment and finish a
    checkpoint after the kill, which moves the restart point after the test has read it.
    The embedded redis-server is left alive, as after a real crash of the driver (it runs in
    its own session so that its AOF is flushed); the resumed job must stop it and reuse its
    data.
    """
    # stop first (a stopped process starts no more), until the family stops growing
    family: dict[int, psutil.Process] = {}
    redis_pid = -1
    while True:
        root = psutil.Process(proc.pid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)] if p.pid not in family}
        if not found:
            break
        family.update(found)
        for p in found.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.name() == "redis-server":
                    redis_pid = p.pid
                else:
                    p.suspend()
    redis = family.pop(redis_pid)
    for p in family.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    _, alive = psutil.wait_procs(list(family.values()), timeout=30)
    assert not alive, f"still alive after SIGKILL: {alive}"
    assert redis.is_running()
    return redis.pid


def test_resume_after_sigkill_continues_from_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        *TINY,
        f"trainer.steps={STEPS}",
        "checkpoint.interval=2",
        "rollout.eval.interval=0",
    ]
    cmd = _physarum("run", "configs/toy_grpo.yaml", *[x for o in overrides for x in ("--set", o)])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while max(_steps(run_dir), default=0) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        redis_pid = _kill_all_but_redis(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        _check_resume(run_dir, env, redis_pid)
    finally:  # never leave the orphaned redis-server behind, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGKILL)


def _check_resume(run_dir: Path, env: dict[str, str], orphan_redis: int) -> None:
    killed_at = max(_steps(run_dir))
    assert killed_at < STEPS
    # the last complete checkpoint at the kill; a step is checkpointed before it is logged,
    # so it can be one past the last logged step
    restart = max(
        int(p.parent.name.removeprefix("step_"))
        for p in (run_dir / "checkpoints").glob("step_*/COMPLETE")
    )
    assert 2 <= restart < STEPS

    done = subprocess.run(
        _physarum("run", "--resume", str(run_dir)),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not psutil.pid_exists(orphan_redis), "the resumed job did not stop the old redis"
    assert "still serves" in done.stdout + done.stderr  # it said so (the console is stdout)
    steps = _steps(run_dir)
    resumed = steps[steps.index(killed_at) + 1 :]
    assert resumed == list(range(restart + 1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "COMPLETE").read_text() == str(STEPS)
    assert "finished" in done.stdout
