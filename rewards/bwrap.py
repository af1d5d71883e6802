"""bubblewrap for the code sandbox: the bwrap argv (namespaces, mounts) and the pids cgroup.

`rewards.sandbox` explains what the sandbox guarantees; this module holds the host-specific
parts: whether bwrap works here, the namespace flags for a root or a user caller, the mount
list (read-only root, private /tmp, hidden dirs, the interpreter bound back), and the
per-run pids cgroup that bounds processes when the caller is root.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

HIDDEN = ("/var/tmp", "/home", "/root", "/run", "/mnt", "/media", "/srv")
WORKDIR = "/tmp/physarum-sandbox"  # inside the bwrap sandbox, on its private tmpfs
INPUT = "/tmp/.physarum-input"  # the host temp dir, bound read-only, copied to WORKDIR
SANDBOX_UID = 65534
ROOT = os.geteuid() == 0
_run_ids = itertools.count()


def bwrap_problem(bwrap: str | None = None) -> str | None:
    """None when bwrap can make the sandbox's namespaces here, else why not (for the error)."""
    exe = bwrap or shutil.which("bwrap")
    if exe is None:
        return "`bwrap` (bubblewrap) is not on PATH"
    argv = [exe, *namespaces(), "--ro-bind", "/", "/"]
    try:
        probe = subprocess.run([*argv, "--", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{exe}` does not run: {exc}"
    if probe.returncode != 0:
        reason = probe.stderr.decode("utf-8", "replace").strip()
        flags = " ".join(namespaces()[:5])
        return f"`{exe} {flags} ...` fails here: {reason or f'exit {probe.returncode}'}"
    return None


def namespaces() -> list[str]:
    """bwrap's namespace flags. Not root: ``--unshare-all`` as uid 65534 in a user namespace.
    Root: the same namespaces except the user one, whose uid 65534 would still be the host's
    root for file permissions (reading 0600 secrets, /etc/shadow); the bootstrap instead
    drops to the host's uid 65534 with the two capabilities kept for that (then none)."""
    if not ROOT:
        return ["--unshare-all", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    unshare = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    return [*unshare, "--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]


def mounts(inputs: str, *, tmpfs_mb: int, hide: Sequence[str], python: str) -> list[str]:
    """bwrap's mount flags: read-only root, private /tmp of `tmpfs_mb` with WORKDIR, HIDDEN
    and `hide` covered, the interpreter's dirs under them bound back, `inputs` at INPUT."""
    hidden = [p for p in (*HIDDEN, *hide) if os.path.isdir(p)]
    argv = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    argv += ["--perms", "01777", "--size", str(tmpfs_mb * 2**20), "--tmpfs", "/tmp"]
    for path in hidden:
        argv += ["--perms", "0755", "--tmpfs", path]
    for path in python_dirs(python, ["/tmp", *hidden]):
        for parent in parents_below(path, ["/tmp", *hidden]):
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", path, path]
    return [*argv, "--ro-bind", inputs, INPUT, "--perms", "01777", "--dir", WORKDIR]


def pids_cgroup() -> str | None:
    """A writable pids-cgroup dir to create per-run children in (cgroup v1 or v2), or None."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidate = os.path.join("/sys/fs/cgroup/pids", path.lstrip("/"))
        elif controllers == "" and _v2_has_pids(path):
            candidate = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        else:
            continue
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return None


def _v2_has_pids(path: str) -> bool:
    control = os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cgroup.subtree_control")
    with contextlib.suppress(OSError), open(control, encoding="utf-8") as handle:
        return "pids" in handle.read().split()
    return False


def make_cgroup(base: str, max_pids: int) -> str:
    """A fresh child of the pids cgroup `base` allowing `max_pids` tasks; raises OSError."""
    path = os.path.join(base, f"physarum-sandbox-{os.getpid()}-{next(_run_ids)}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "pids.max"), "w") as handle:
            handle.write(str(max_pids))
    except OSError:
        remove_cgroup(path)
        raise
    return path


def remove_cgroup(path: str | None) -> None:
    """rmdir a per-run cgroup once its processes are gone (the kill is asynchronous)."""
    if path is None:
        return
    for _ in range(1000):  # usually a few ms after bwrap exits
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.001)
    raise OSError(f"sandbox: the pids cgroup {path} is still busy")


def python_dirs(python: str, hidden: Sequence[str]) -> list[str]:
    """The interpreter's install dirs that lie under a hidden path (bound back read-only)."""
    # the venv (python's own dir's parent) and the install it links to; sys's prefixes when
    # `python` is this interpreter
    dirs = {os.path.dirname(os.path.dirname(p)) for p in (python, os.path.realpath(python))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
        dirs |= {os.path.realpath(p) for p in prefixes}
    roots = [h.rstrip("/") + os.sep for h in hidden]
    under = [d for d in dirs if any((d + os.sep).startswith(root) for root in roots)]
    return sorted(d for d in under if not any(d != o and d.startswith(o + os.sep) for o in under))


def parents_below(path: str, hidden: Sequence[str]) -> list[str]:
    """The dirs between the hidden root that holds `path` and `path` (made 0755 there)."""
    for root in hidden:
        root = root.rstrip("/")
        if path.startswith(root + os.sep):
            parts = path[len(root) + 1 :].split(os.sep)[:-1]
            return [os.path.join(root, *parts[: i + 1]) for i in range(len(parts))]
    return []
