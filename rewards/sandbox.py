"""Run untrusted Python in an isolated subprocess: bubblewrap namespaces plus rlimits.

Used by the `code` reward (tests against generated code) and the Python tool environment.
One `Sandbox` holds the limits; `await sandbox.run(code)` runs `code` as ``main.py``, and
`sandbox.open(code)` starts it with live pipes (the `code` reward talks to two at once).

Isolation (``isolation == "bwrap"``, the default; needs `bwrap`, Debian package
``bubblewrap``, which ``scripts/setup.sh`` installs):

* ``bwrap --unshare-all``: new user, mount, pid, network, IPC, UTS and cgroup namespaces. The
  network namespace holds only a down loopback, so every connect fails (the host's
  127.0.0.1 included). The code runs as uid/gid 65534 with no capabilities. When this
  process is root, uid 65534 of a user namespace would still be the host's root for file
  permissions (0600 secrets, /etc/shadow), so there bwrap makes every namespace but the
  user one and the bootstrap drops to the host's uid/gid 65534 before the user code
  (bwrap sets no_new_privs: setuid binaries give nothing back).
* ``--ro-bind / /``: the root is read-only; then a private, size-limited tmpfs on ``/tmp``
  holds the work dir ``/tmp/physarum-sandbox`` (cwd, HOME, TMPDIR), into which the input
  files are copied. ``/var/tmp``, ``/home``, ``/root``, ``/run``, ``/mnt``, ``/media``,
  ``/srv`` and the paths in ``hide`` are covered by empty tmpfs (nothing there can be read);
  the Python installation is bound back read-only when it lives under one of them. ``/proc``
  is the new pid namespace's, ``/dev`` a minimal one.
* ``--die-with-parent`` and ``--new-session``: the sandbox dies with its bwrap, and bwrap is
  killed with its process group on the wall-clock timeout or when the caller is cancelled.
* rlimits, set in the sandbox before the user code: RLIMIT_NPROC (processes), RLIMIT_CPU
  (CPU seconds; SIGXCPU, then SIGKILL a second later), RLIMIT_AS (address space),
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE = 0. The kernel never applies RLIMIT_NPROC to
  host uid 0, so when this process runs as root the process limit is a pids cgroup per run
  (``pids.max``); a root without a writable pids cgroup cannot bound processes and the
  Sandbox refuses to start.

When bwrap is missing or cannot create namespaces here, `Sandbox(...)` raises `SandboxError`
naming the tool and how to install it. ``allow_weak=True`` (the ``allow_weak: true`` arg of
the reward or env) instead logs a loud warning and runs in ``isolation == "weak"`` mode:
rlimits, ``unshare -n`` when it works, and the audit hook below. That mode is NOT a
security boundary: native code (ctypes) escapes it (writes anywhere, forks, connects).

Both modes: the interpreter runs with ``-I -B`` and an environment of only PATH, LANG and the
temp dirs; stdout and stderr are captured up to `max_output_bytes` each; and, unless
``audit_hook=False``, a `sys.addaudithook` refuses sockets, DNS, process spawning, signals and
Python-level writes outside the work dir with a readable PermissionError (a courtesy to the
model in bwrap mode, the only barrier in weak mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from rewards import bwrap
from rewards.bwrap import (
    INPUT,
    ROOT,
    SANDBOX_UID,
    WORKDIR,
    bwrap_problem,
    pids_cgroup,
)
from rewards.sandbox_io import Capture, SandboxResult, feed, kill_group

logger = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get install -y bubblewrap` (scripts/setup.sh does)"

# Runs in the child, before the user code: drop privileges, inputs, limits, audit hook, main.py.
_BOOTSTRAP = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")


class SandboxError(RuntimeError):
    """The sandbox itself cannot run as configured (not a failure of the user code)."""


def unshare_available() -> bool:
    """True when `unshare -n` can create a network namespace here (needs root or userns)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class Sandbox:
    """Isolation and limits for running untrusted Python; see the module docstring.

    processes   most processes and threads at once, the code's own included
    tmpfs_mb    size of the private /tmp holding the work dir (bwrap mode)
    hide        more host paths to cover with an empty tmpfs (bwrap mode)
    allow_weak  run without bwrap (loudly) instead of refusing; NOT isolation
    """

    def __init__(
        self,
        *,
        cpu_s: int = 5,
        memory_mb: int = 512,
        wall_s: float = 10.0,
        max_output_bytes: int = 64 * 1024,
        file_size_mb: int = 16,
        open_files: int = 64,
        processes: int = 32,
        tmpfs_mb: int = 256,
        hide: Sequence[str] = (),
        allow_weak: bool = False,
        audit_hook: bool = True,
        python: str = sys.executable,
    ) -> None:
        _check_limits(
            cpu_s=cpu_s,
            memory_mb=memory_mb,
            file_size_mb=file_size_mb,
            open_files=open_files,
            processes=processes,
            tmpfs_mb=tmpfs_mb,
        )
        if not wall_s > 0:
            raise ValueError(f"wall_s: expected > 0, got {wall_s!r}")
        if not isinstance(allow_weak, bool):
            raise ValueError(f"allow_weak: expected true or false, got {allow_weak!r}")
        for path in hide:
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ValueError(f"hide: expected absolute paths, got {path!r}")
        self.cpu_s, self.memory_mb, self.wall_s = cpu_s, memory_mb, float(wall_s)
        self.max_output_bytes, self.python = max_output_bytes, python
        self.file_size_mb, self.open_files, self.audit_hook = file_size_mb, open_files, audit_hook
        self.processes, self.tmpfs_mb, self.hide = processes, tmpfs_mb, tuple(hide)
        self._bwrap = shutil.which("bwrap")
        self._cgroup: str | None = None
        self.uses_unshare = False
        problem = self._isolation_problem()
        if problem is None:
            self.isolation = "bwrap"
        elif not allow_weak:
            raise SandboxError(
                f"the code sandbox needs bubblewrap: {problem}; {INSTALL_HINT}. To run untrusted "
                "code without it anyway (rlimits and an audit hook only: ctypes escapes them), set "
                "allow_weak: true in this reward's or environment's args"
            )
        else:
            self._go_weak(problem)

    def _isolation_problem(self) -> str | None:
        """Why bwrap isolation cannot run here (None: it can); finds the pids cgroup as root."""
        problem = bwrap_problem(self._bwrap)
        if problem is None and os.geteuid() == 0:
            self._cgroup = pids_cgroup()
            if self._cgroup is None:
                problem = (
                    "this process runs as root, where the kernel ignores RLIMIT_NPROC, "
                    "and no writable pids cgroup was found to bound processes"
                )
        return problem

    def _go_weak(self, problem: str) -> None:
        """allow_weak: rlimits, `unshare -n` where it works and the audit hook, said loudly."""
        self.isolation = "weak"
        self.uses_unshare = unshare_available()
        if not (self.uses_unshare or self.audit_hook):
            raise SandboxError("allow_weak: no network barrier: enable audit_hook")
        logger.warning(
            "UNSAFE SANDBOX (allow_weak: true): %s, so untrusted code runs with rlimits and "
            "an audit hook only; native code can write files, fork and%s reach the network. "
            "Fix: %s",
            problem,
            "" if self.uses_unshare else " (no `unshare -n` here)",
            INSTALL_HINT,
        )

    def _make_cgroup(self) -> str | None:
        if self._cgroup is None:
            return None
        try:  # + 2: bwrap and its pid-1 monitor
            return bwrap.make_cgroup(self._cgroup, self.processes + 2)
        except OSError as exc:
            msg = f"processes: cannot create a pids cgroup in {self._cgroup}: {exc}"
            raise SandboxError(msg) from exc

    @property
    def workdir(self) -> str | None:
        """The code's cwd inside the sandbox (bwrap), None when it is a host temp dir (weak)."""
        return WORKDIR if self.isolation == "bwrap" else None

    def command(self, script: str, inputs: str) -> list[str]:
        """The argv that runs `script` under this sandbox; `inputs` is the host dir of files."""
        isolated = self.isolation == "bwrap"
        nproc = 0 if self._cgroup else self.processes  # root: the cgroup counts, not NPROC
        drop = SANDBOX_UID if isolated and ROOT else 0
        limits = [self.cpu_s, self.memory_mb * 2**20, self.file_size_mb * 2**20]
        limits += [self.open_files, nproc, int(self.audit_hook), drop]
        argv = [self.python, "-I", "-B", "-c", _BOOTSTRAP, *map(str, limits)]
        argv += [INPUT if isolated else "-", script]
        if not isolated:
            unshare = shutil.which("unshare") or "unshare"
            return [unshare, "-n", *argv] if self.uses_unshare else argv
        mounts = bwrap.mounts(inputs, tmpfs_mb=self.tmpfs_mb, hide=self.hide, python=self.python)
        bwrap_argv = [self._bwrap or "bwrap", *bwrap.namespaces(), "--die-with-parent"]
        return [*bwrap_argv, "--new-session", *mounts, "--chdir", WORKDIR, "--", *argv]

    @contextlib.asynccontextmanager
    async def open(
        self, code: str, *, files: dict[str, str] | None = None
    ) -> AsyncIterator[asyncio.subprocess.Process]:
        """Start `code` as main.py (plus `files`, name -> text) with stdin/stdout/stderr pipes
        (`readline` takes lines up to 1 MiB). On exit the whole sandbox is killed and removed.
        Raises SandboxError only if the sandbox cannot start."""
        with tempfile.TemporaryDirectory(prefix="physarum-sandbox-") as inputs:
            for name, text in {**(files or {}), "main.py": code}.items():
                path = os.path.join(inputs, name)
                if os.path.dirname(os.path.normpath(path)) != inputs:
                    raise ValueError(f"files: {name!r} must be a plain file name")
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
            os.chmod(inputs, 0o755)
            cgroup = self._make_cgroup()
            try:
                proc = await self._spawn(inputs, cgroup)
                try:
                    yield proc
                finally:
                    if proc.returncode is None:  # cancelled or done early: nothing left behind
                        kill_group(proc)
            finally:
                if cgroup is not None:
                    try:
                        bwrap.remove_cgroup(cgroup)
                    except OSError as exc:
                        logger.warning("%s", exc)

    async def run(
        self, code: str, *, stdin: str = "", files: dict[str, str] | None = None
    ) -> SandboxResult:
        """Run `code` as main.py in a fresh work dir (plus `files`, name -> text); never raises
        for anything the code does. Raises SandboxError only if the sandbox cannot start."""
        start = time.monotonic()
        out, err = Capture(self.max_output_bytes), Capture(self.max_output_bytes)
        timed_out = False
        async with self.open(code, files=files) as proc:
            try:
                await asyncio.wait_for(
                    asyncio.gather(
                        out.drain(proc.stdout),
                        err.drain(proc.stderr),
                        feed(proc, stdin),
                        proc.wait(),
                    ),
                    self.wall_s,
                )
            except TimeoutError:
                timed_out = True
                kill_group(proc)
                await proc.wait()
        return SandboxResult(
            returncode=self.returncode(proc.returncode),
            stdout=out.text(),
            stderr=err.text(),
            timed_out=timed_out,
            duration_s=time.monotonic() - start,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )

    def returncode(self, raw: int | None) -> int:
        """The code's exit status; bwrap reports a child killed by signal N as 128 + N."""
        if raw is None:
            return -signal.SIGKILL
        if self.isolation == "bwrap" and 128 < raw <= 128 + 64:
            return 128 - raw
        return raw

    async def _spawn(self, inputs: str, cgroup: str | None) -> asyncio.subprocess.Process:
        work = WORKDIR if self.isolation == "bwrap" else inputs
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        join: Callable[[], None] | None = None
        if cgroup is not None:
            procs = os.path.join(cgroup, "cgroup.procs")

            def join() -> None:  # runs in the child between fork and exec
                with open(procs, "w") as handle:
                    handle.write(str(os.getpid()))

        try:
            return await asyncio.create_subprocess_exec(
                *self.command("main.py", inputs),
                cwd=inputs,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=join,
                limit=2**20,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxError(f"cannot start the sandbox ({self.isolation}): {exc}") from exc


def _check_limits(**limits: int) -> None:
    for name, value in limits.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
