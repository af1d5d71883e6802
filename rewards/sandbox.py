"""Run untrusted Python in a subprocess with resource limits and no network.

Used by the `code` reward (tests against generated code) and the Python tool environment.
One `Sandbox` holds the limits; `await sandbox.run(code)` runs `code` as ``main.py``:

* a fresh temporary directory is the cwd (also TMPDIR and HOME) and is deleted afterwards;
* the child sets its own limits before the user code starts: RLIMIT_CPU (CPU seconds; the
  kernel sends SIGXCPU, then SIGKILL one second later), RLIMIT_AS (address space, so a
  memory bomb gets MemoryError or dies), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE = 0;
* it runs in its own session / process group; on the wall-clock timeout, or when the caller
  is cancelled, the whole group is SIGKILLed;
* environment: only PATH, LANG and the temp dirs; the interpreter runs with ``-I -B``
  (isolated: no PYTHON* variables, no user site, script dir not on sys.path; no .pyc writes);
* stdout and stderr are captured up to `max_output_bytes` each (the rest is drained and
  dropped, so a print loop cannot fill memory).

No network, two layers (measured on this machine: running as root, `unshare -n` works):

1. ``unshare -n`` (a new, empty network namespace: every connect fails) when available.
   `use_unshare=None` probes for it once per Sandbox; True requires it; False skips it.
2. A `sys.addaudithook` installed in the child before the user code (`audit_hook=True`):
   creating or connecting a socket, DNS lookups, spawning processes (subprocess, os.system,
   exec*, fork, posix_spawn), signalling other processes, and writing, removing or linking
   files outside the temp dir raise PermissionError. Audit hooks cannot be removed from
   Python, but they are a best-effort barrier: native code (ctypes, private C modules) can
   bypass them. Only the namespace is a hard network barrier; neither isolates the file
   system from reading. Run the whole service in a container for hostile workloads.
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
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Runs in the child, before the user code: limits, then the audit hook, then main.py.
_BOOTSTRAP = r"""
import os, resource, sys
cpu, mem, fsize, nofile, audit = (int(a) for a in sys.argv[1:6])
script = sys.argv[6]
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
if audit:
    root = os.getcwd() + os.sep
    denied = frozenset((
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "pty.spawn", "os.kill", "os.killpg", "os.symlink", "os.link",
    ))
    paths = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
             "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
             "shutil.rmtree": (0,)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def inside(path):
        if isinstance(path, int):
            return True
        path = os.path.normpath(os.path.join(root, os.fsdecode(path)))
        return (path + os.sep).startswith(root)
    def hook(event, args):
        if event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed (no network, no processes)")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if path is not None and writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox dir")
        elif event in paths:
            for i in paths[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the dir")
    sys.addaudithook(hook)
sys.argv = [script]
sys.path.insert(0, os.getcwd())  # like `python main.py`: the script's dir is importable
import runpy
runpy.run_path(script, run_name="__main__")
"""


class SandboxError(RuntimeError):
    """The sandbox itself cannot run as configured (not a failure of the user code)."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    returncode  exit status; negative = killed by that signal (e.g. -24 SIGXCPU, -9 SIGKILL)
    timed_out   killed on the wall-clock timeout
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def status(self) -> str:
        """ "ok", "timeout" (wall clock), "cpu_limit", "memory_limit", "killed" or "error"."""
        if self.timed_out:
            return "timeout"
        if self.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return "cpu_limit" if self.returncode == -signal.SIGXCPU else "killed"
        if self.returncode != 0 and "MemoryError" in self.stderr[-2000:]:
            return "memory_limit"
        return "ok" if self.returncode == 0 else "error"


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
    """Limits for running untrusted Python; see the module docstring for what each does."""

    def __init__(
        self,
        *,
        cpu_s: int = 5,
        memory_mb: int = 512,
        wall_s: float = 10.0,
        max_output_bytes: int = 64 * 1024,
        file_size_mb: int = 16,
        open_files: int = 64,
        use_unshare: bool | None = None,
        audit_hook: bool = True,
        python: str = sys.executable,
    ) -> None:
        for field_name, value in (("cpu_s", cpu_s), ("memory_mb", memory_mb)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name}: expected an int >= 1, got {value!r}")
        if not wall_s > 0:
            raise ValueError(f"wall_s: expected > 0, got {wall_s!r}")
        self.cpu_s, self.memory_mb, self.wall_s = cpu_s, memory_mb, float(wall_s)
        self.max_output_bytes, self.python = max_output_bytes, python
        self.file_size_mb, self.open_files, self.audit_hook = file_size_mb, open_files, audit_hook
        available = unshare_available() if use_unshare is not False else False
        self._unshare = shutil.which("unshare") or "unshare"
        if use_unshare and not available:
            raise SandboxError("use_unshare=True but `unshare -n` does not work on this machine")
        self.uses_unshare = available
        if not (self.uses_unshare or self.audit_hook):
            raise SandboxError("no network barrier: enable use_unshare or audit_hook")

    def command(self, script: str) -> list[str]:
        """The argv that runs `script` under this sandbox's limits."""
        limits = [
            self.cpu_s,
            self.memory_mb * 2**20,
            self.file_size_mb * 2**20,
            self.open_files,
            int(self.audit_hook),
        ]
        argv = [self.python, "-I", "-B", "-c", _BOOTSTRAP, *map(str, limits), script]
        return [self._unshare, "-n", *argv] if self.uses_unshare else argv

    async def run(
        self, code: str, *, stdin: str = "", files: dict[str, str] | None = None
    ) -> SandboxResult:
        """Run `code` as main.py in a fresh temp dir (plus `files`, name -> text); never raises
        for anything the code does. Raises SandboxError only if the interpreter cannot start."""
        with tempfile.TemporaryDirectory(prefix="physarum-sandbox-") as workdir:
            for name, text in {**(files or {}), "main.py": code}.items():
                path = os.path.join(workdir, name)
                if os.path.dirname(os.path.normpath(path)) != workdir:
                    raise ValueError(f"files: {name!r} must be a plain file name")
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
            return await self._run_in(workdir, stdin)

    async def _run_in(self, workdir: str, stdin: str) -> SandboxResult:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        start = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command("main.py"),
                cwd=workdir,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(f"cannot start {self.python!r}: {exc}") from exc
        out, err = _Capture(self.max_output_bytes), _Capture(self.max_output_bytes)
        timed_out = False
        try:
            await asyncio.wait_for(
                asyncio.gather(out.drain(proc.stdout), err.drain(proc.stderr), _feed(proc, stdin)),
                self.wall_s,
            )
            await proc.wait()
        except TimeoutError:
            timed_out = True
            _kill_group(proc)
            await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled by the caller: never leave a child behind
                _kill_group(proc)
        return SandboxResult(
            returncode=proc.returncode if proc.returncode is not None else -signal.SIGKILL,
            stdout=out.text(),
            stderr=err.text(),
            timed_out=timed_out,
            duration_s=time.monotonic() - start,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )


class _Capture:
    """Keeps the first `cap` bytes of a stream and drops the rest (still reading to EOF)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.truncated = False

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            room = self.cap - len(self.kept)
            if len(chunk) > room:
                self.truncated = True
            self.kept += chunk[: max(room, 0)]

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


async def _feed(proc: asyncio.subprocess.Process, data: str) -> None:
    if proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            proc.stdin.write(data.encode("utf-8"))
            await proc.stdin.drain()
        proc.stdin.close()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
