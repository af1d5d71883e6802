"""Small C kernel libraries (models/*_kernels.c) built on first use and loaded with ctypes.

Each library is compiled once per machine with the system C compiler (`cc -O3 -march=native`,
~0.5-0.7 s) into ~/.cache/physarum (or $PHYSARUM_CACHE), under a name keyed by its source
(with the local headers it includes), the flags and the CPU's feature flags, so an edited
source or header, or another CPU, gets its own build.
Where there is no compiler, no writable cache or no Linux, `load` gives None and the caller
runs its torch ops instead. The kernels take raw pointers: no torch headers, no Python ABI.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC"]
Signatures = dict[str, list[type]]  # function name -> ctypes argument types (all return void)


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def library_path(source: Path) -> Path:
    """Where `source`'s build for this machine lives."""
    text = source.read_bytes()
    for name in re.findall(rb'^#include "([^"]+)"', text, re.MULTILINE):  # local headers
        text += (source.parent / name.decode()).read_bytes()
    digest = hashlib.sha256(text + " ".join(FLAGS).encode())
    digest.update(_cpu_flags().encode() + platform.machine().encode())
    root = Path(os.environ.get("PHYSARUM_CACHE", Path.home() / ".cache" / "physarum"))
    return root / f"{source.stem}_{digest.hexdigest()[:16]}.so"


def _build(source: Path, path: Path) -> None:
    """Compile into a temporary file and rename it into place: concurrent builders each
    write their own file and the last rename wins (identical bytes), so no process ever
    loads a half-written library."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-o", tmp, str(source), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def _load(source: Path, signature_items: tuple[tuple[str, tuple[type, ...]], ...]):
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        path = library_path(source)
        if not path.exists():
            _build(source, path)
        lib = ctypes.CDLL(str(path))
        for name, args in signature_items:
            function = getattr(lib, name)
            function.argtypes, function.restype = list(args), None
    # RuntimeError: no home directory for the cache; AttributeError: a missing symbol
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
        log.warning("%s unavailable (%s): torch ops instead", source.name, err)
        return None
    return lib


def load(source: Path, signatures: Signatures) -> ctypes.CDLL | None:
    """The library built from `source` with these functions typed; None where it cannot be
    built or loaded here (the caller's torch path runs). Loaded once per process."""
    return _load(source, tuple((name, tuple(args)) for name, args in signatures.items()))
