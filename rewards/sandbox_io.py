"""What a sandboxed run gives back, and the pipe plumbing around the sandboxed process.

`SandboxResult` is the outcome of `Sandbox.run`; `Capture` keeps a bounded prefix of an output
stream (an output flood is read to EOF and dropped, never held); `feed` writes stdin and
closes it; `kill_group` ends the sandbox's whole process group (bwrap and everything under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass


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


class Capture:
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


async def feed(proc: asyncio.subprocess.Process, data: str) -> None:
    if proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            proc.stdin.write(data.encode("utf-8"))
            await proc.stdin.drain()
        proc.stdin.close()


def kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
