"""Escape attempts against the code sandbox, each checked from the host side.

Writes: five ways that got past the Python-level audit hook of the old sandbox, aimed at a
host dir under /tmp (covered by the sandbox's private tmpfs) and at one on the read-only
root (the repo's git-ignored tmp/). Then: reading host files, ctypes fork and a fork bomb
against the process limit, file size and open files limits, and processes left behind.
The weak-mode test runs the same writes without bwrap and sees them land: the checks can fail.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rewards import sandbox as sandbox_module
from rewards.sandbox import Sandbox

REPO_TMP = Path(__file__).resolve().parents[2] / "tmp"  # git-ignored, on the read-only root

# Each writes `{name}` into `{dir}`; the audit hook sees none of them as a write outside.
WRITES = {
    "chdir + relative open": "import os\nos.chdir({dir!r})\nopen({name!r}, 'w').write('x')\n",
    "os.open dir_fd": (
        "import os\nfd = os.open({dir!r}, os.O_RDONLY)\n"
        "os.close(os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n"
    ),
    "sqlite3.connect": (
        "import sqlite3\nsqlite3.connect({dir!r} + '/' + {name!r}).execute('create table t (x)')\n"
    ),
    "os.mkfifo": "import os\nos.mkfifo({dir!r} + '/' + {name!r})\n",
    "ctypes fopen": (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "f = libc.fopen(({dir!r} + '/' + {name!r}).encode(), b'w')\n"
        "print('fopen', bool(f))\n"
    ),
}
PROBE = "\nprint('DONE')\n"  # printed only when the attempt raised nothing


def run(sandbox: Sandbox, code: str):
    return asyncio.run(sandbox.run(code))


@pytest.fixture
def repo_tmp() -> Iterator[Path]:
    """A host dir the sandbox shows read-only. The repo's tmp/ is that unless the clone
    itself lies under a dir the sandbox hides (CI may clone under /tmp); as root, /var/lib
    is always shown, so it is used instead."""
    root = Path("/var/lib") if psutil.os.geteuid() == 0 else REPO_TMP
    root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="physarum-escape-") as path:
        yield Path(path)


@pytest.mark.parametrize("how", sorted(WRITES))
@pytest.mark.parametrize("where", ["host /tmp", "read-only root"])
def test_writes_outside_the_work_dir_do_not_reach_the_host(
    how: str, where: str, tmp_path: Path, repo_tmp: Path
) -> None:
    target = tmp_path if where == "host /tmp" else repo_tmp
    before = sorted(target.iterdir())
    result = run(Sandbox(), WRITES[how].format(dir=str(target), name="escaped") + PROBE)
    assert sorted(target.iterdir()) == before == [], result.stdout + result.stderr[-500:]
    if where == "read-only root":  # the dir exists in the sandbox: the write itself fails
        assert "DONE" not in result.stdout or "fopen False" in result.stdout


@pytest.mark.parametrize("how", sorted(WRITES))
def test_weak_mode_lets_the_same_writes_through(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents why allow_weak is unsafe, and that the assertions above can fail."""
    monkeypatch.setattr(sandbox_module, "bwrap_problem", lambda exe: "bwrap disabled by a test")
    sandbox = Sandbox(allow_weak=True)
    assert sandbox.isolation == "weak"
    result = run(sandbox, WRITES[how].format(dir=str(tmp_path), name="escaped"))
    assert (tmp_path / "escaped").exists(), result.stderr[-500:]


def test_host_files_cannot_be_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    code = (
        "import glob, os\n"
        f"for path in [{str(secret)!r}, '/root', '/home', '/run']:\n"
        "    try:\n"
        "        print(path, open(path).read() if os.path.isfile(path) else os.listdir(path))\n"
        "    except OSError as exc:\n"
        "        print(path, type(exc).__name__)\n"
    )
    result = run(Sandbox(), code)
    assert result.ok, result.stderr
    assert "hunter2" not in result.stdout
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines[str(secret)] == "FileNotFoundError"
    assert lines["/home"] == "[]" and lines["/run"] == "[]"
    assert set(eval(lines["/root"])) <= {".pyenv"}  # only the bound-back interpreter, if any


@pytest.mark.skipif(psutil.os.geteuid() != 0, reason="as a user, the code runs as that user")
def test_as_root_the_code_has_no_root_file_access(repo_tmp: Path) -> None:
    secret = repo_tmp / "secret.txt"  # on the read-only root, not under a hidden dir
    secret.write_text("hunter2")
    secret.chmod(0o600)
    code = (
        f"for path in [{str(secret)!r}, '/etc/shadow']:\n"
        "    try:\n"
        "        print(path, open(path).read()[:20])\n"
        "    except OSError as exc:\n"
        "        print(path, type(exc).__name__)\n"
    )
    result = run(Sandbox(), code)
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == [
        f"{secret} PermissionError",
        "/etc/shadow PermissionError",
    ]


FORKS = (
    "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\nforked = 0\n"
    "for _ in range(100):\n"
    "    pid = libc.fork()\n"
    "    if pid == 0:\n"
    "        time.sleep(5)\n"
    "        libc._exit(0)\n"
    "    if pid < 0:\n"
    "        break\n"
    "    forked += 1\n"
    "print('forked', forked, 'errno', ctypes.get_errno(), flush=True)\n"
)


def test_ctypes_fork_is_bounded_by_the_process_limit() -> None:
    result = run(Sandbox(processes=8, wall_s=20), FORKS)
    assert result.ok, result.stderr
    words = result.stdout.split()
    assert words[0] == "forked" and 1 <= int(words[1]) < 8, result.stdout  # 8 with itself
    assert words[3] == "11"  # EAGAIN


def sandbox_processes() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    }


def test_fork_bomb_is_contained_and_nothing_is_left_behind() -> None:
    baseline = sandbox_processes()
    bomb = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    result = run(Sandbox(processes=16, wall_s=3), bomb)
    assert result.timed_out
    assert psutil.cpu_count() and len(psutil.pids()) < 100_000  # the host is still usable
    assert sandbox_processes() - baseline == set()


def test_file_size_and_open_files_limits() -> None:
    big = run(Sandbox(file_size_mb=1), "open('big', 'wb').write(b'x' * 2**21)")
    assert big.returncode == 1 and "File too large" in big.stderr, big.stderr[-300:]
    files = "handles = [open('f%d' % i, 'w') for i in range(100)]"
    many = run(Sandbox(open_files=16), files)
    assert many.returncode == 1 and "Too many open files" in many.stderr, many.stderr[-300:]


def test_filling_the_private_tmpfs_stops_at_its_size() -> None:
    code = (
        "i = 0\n"
        "try:\n"
        "    while True:\n"
        "        open('f%d' % i, 'wb').write(b'x' * 2**20)\n"
        "        i += 1\n"
        "except OSError as exc:\n"
        "    print(i, exc.errno)\n"
    )
    result = run(Sandbox(tmpfs_mb=8, file_size_mb=4), code)
    written, errno = result.stdout.split()
    assert int(written) <= 8 and errno == "28", result.stdout  # ENOSPC
