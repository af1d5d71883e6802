"""Ports for SGLang servers: reserved until the server holds them, then checked to be ours.

A server binds its port only at the end of its start-up (~35-70 s here), so a port that is
free when one launch picks it is still free when a second launch checks it: both used to pick
`base_port` (30000), and the second server either died on the bind or, worse, its launcher
saw the first job's server answer /health and talked to it.

Two guards:
- `reserve_port`: a launch holds an exclusive `flock` on
  `<tmp>/physarum-ports-<uid>/<host>-<port>` from the pick until its server answers
  (`PortReservation.release`); any other launch of this user on this machine skips a held
  port. The lock dies with its process, so a crash leaks nothing.
- `listener_owned_by`: after /health answers, the listening socket on the port must belong to
  the server's own process group (Linux /proc: the socket inode in /proc/net/tcp{,6} among the
  group's file descriptors). A server that is not ours (a process outside physarum took the
  port in the window) is detected instead of used.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# per user: another user's lock files would not open here (launches of other users are
# caught by the listener check)
LOCK_DIR = Path(tempfile.gettempdir()) / f"physarum-ports-{os.getuid()}"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def port_free(host: str, port: int) -> bool:
    """Nothing is bound to (host, port) right now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS calls free on `host` right now (not reserved)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class PortReservation:
    """A port held for one launch (an exclusive lock file) until `release()`."""

    host: str
    port: int
    _lock: IO[bytes] | None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def reserve_port(host: str, port: int) -> PortReservation | None:
    """Hold `port` for a launch; None when it is bound or another launch holds it."""
    if not port_free(host, port):
        return None
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK_DIR / f"{host}-{port}.lock", "ab")  # noqa: SIM115 (held past return)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    if not port_free(host, port):  # bound between the first check and the lock
        lock.close()
        return None
    return PortReservation(host, port, lock)


def reserve_free_port(host: str, tries: int = 50) -> PortReservation:
    """A free port the OS picks, reserved; raises OSError when none could be held."""
    for _ in range(tries):
        reservation = reserve_port(host, free_port(host))
        if reservation is not None:
            return reservation
    raise OSError(f"no free port on {host} could be reserved in {tries} tries")


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def listener_owned_by(pgid: int, port: int) -> bool | None:
    """Whether the socket listening on `port` belongs to a process of group `pgid`; None
    when this cannot be told (no /proc, or nothing listens)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in _group_pids(pgid):
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # exited, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return True
            except OSError:
                continue
    return False
