"""The code sandbox: bwrap isolation, rlimits, output cap, cleanup, and escape attempts.

Each escape test asserts on the host side (files, listener, processes) that nothing
changed; the same escapes run in weak mode (the pre-bwrap sandbox) show that they do leak
there, so the assertions can fail. They need bwrap (scripts/setup.sh installs it); without it
they fail with the SandboxError that names it, as a job would: they are not skipped.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from rewards import sandbox as sandbox_module
from rewards.sandbox import WORKDIR, Sandbox, SandboxError


def run(sandbox: Sandbox, code: str, **kwargs):
    return asyncio.run(sandbox.run(code, **kwargs))


@pytest.fixture
def listener() -> Iterator[tuple[int, list]]:
    """A real TCP server on 127.0.0.1 recording every connection it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()
    for conn in accepted:
        conn.close()


def test_runs_code_with_stdin_and_files_in_a_private_work_dir() -> None:
    code = (
        "import os, sys, helper\n"
        "print(helper.VALUE, sys.stdin.read().strip(), os.getcwd(), os.getuid())\n"
        "open('scratch.txt', 'w').write('ok')\n"
    )
    sandbox = Sandbox()
    assert sandbox.isolation == "bwrap"
    result = run(sandbox, code, stdin="hello", files={"helper.py": "VALUE=7"})
    assert result.ok and result.status == "ok", result.stderr
    assert result.stdout.split() == ["7", "hello", WORKDIR, "65534"]
    assert not psutil.os.path.exists(WORKDIR)  # the work dir never existed on the host


def test_infinite_loop_is_killed_by_the_cpu_limit() -> None:
    result = run(Sandbox(cpu_s=1, wall_s=30), "while True:\n    pass\n")
    assert result.status == "cpu_limit" and result.returncode < 0
    assert not result.timed_out


def test_memory_bomb_is_stopped() -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n"
    result = run(Sandbox(memory_mb=256, cpu_s=10, wall_s=30), code)
    assert result.status == "memory_limit", (result.returncode, result.stderr[-300:])
    assert "MemoryError" in result.stderr


def test_sleeping_code_is_killed_on_the_wall_timeout() -> None:
    # 3 s: the child must start and print before the kill, even on a busy CPU
    result = run(Sandbox(wall_s=3.0), "import time\nprint('started', flush=True)\ntime.sleep(60)")
    assert result.timed_out and result.status == "timeout"
    assert result.stdout.strip() == "started"  # output before the kill is kept
    assert result.duration_s < 30


def test_connect_is_refused_by_the_audit_hook(listener: tuple[int, list]) -> None:
    port, accepted = listener
    with socket.create_connection(("127.0.0.1", port)):  # the server is reachable from here
        pass
    deadline = time.monotonic() + 10.0
    while not accepted:  # wait for the listener to record it, however busy the CPU
        assert time.monotonic() < deadline, "the listener never accepted the connection"
        time.sleep(0.01)
    baseline = len(accepted)
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    result = run(Sandbox(audit_hook=True), code)
    assert result.returncode == 1
    assert "PermissionError: sandbox: socket" in result.stderr
    time.sleep(0.3)
    assert len(accepted) == baseline


def wait_accepted(port: int, accepted: list) -> int:
    """Connect from the host first (the listener works), return the accepted count."""
    with socket.create_connection(("127.0.0.1", port)):
        pass
    deadline = time.monotonic() + 10.0
    while not accepted:  # wait for the listener to record it, however busy the CPU
        assert time.monotonic() < deadline, "the listener never accepted the connection"
        time.sleep(0.01)
    return len(accepted)


CONNECTS = {
    "socket": (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
    ),
    "ctypes": (  # below the audit hook: libc socket() + connect()
        "import ctypes, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(2, 1, 0)\n"
        "addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1])\n"
        "addr += bytes(8)\n"
        "rc = libc.connect(fd, addr, 16)\n"
        "print('connected' if rc == 0 else 'refused', ctypes.get_errno())\n"
    ),
}


@pytest.mark.parametrize("how", sorted(CONNECTS))
def test_connect_to_the_hosts_loopback_is_refused(listener: tuple[int, list], how: str) -> None:
    port, accepted = listener
    baseline = wait_accepted(port, accepted)
    result = run(Sandbox(audit_hook=False), CONNECTS[how].format(port=port))
    assert result.ok, result.stderr
    assert result.stdout.startswith("refused"), result.stdout
    time.sleep(0.3)
    assert len(accepted) == baseline


@pytest.mark.parametrize(
    "code, fragment",
    [
        ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen is not allowed"),
        ("import os\nos.system('true')", "os.system is not allowed"),
        ("import os\nos.kill(1, 0)", "os.kill is not allowed"),
        ("open('/tmp/physarum-escape.txt', 'w')", "outside the sandbox dir"),
        ("import os\nos.remove('/etc/hostname')", "os.remove on '/etc/hostname'"),
        ("import os\nos.symlink('/etc', 'etc')", "os.symlink is not allowed"),
        ("import socket\nsocket.getaddrinfo('example.com', 80)", "socket.getaddrinfo"),
    ],
)
def test_audit_hook_blocks_processes_and_writes_outside(code: str, fragment: str) -> None:
    result = run(Sandbox(), code)
    assert result.returncode == 1 and fragment in result.stderr, result.stderr[-300:]


def test_output_is_capped() -> None:
    result = run(Sandbox(max_output_bytes=1000), "print('x' * 100_000)")
    assert result.ok and len(result.stdout) == 1000 and result.stdout_truncated


def test_cancelling_the_caller_kills_the_child() -> None:
    def children() -> set[int]:
        return {
            p.pid
            for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        }

    async def scenario() -> tuple[set[int], set[int]]:
        baseline = children()  # other tests' servers in the same pytest process
        task = asyncio.create_task(Sandbox(wall_s=60).run("import time\ntime.sleep(60)"))
        deadline = time.monotonic() + 10.0
        while not (sandboxed := children() - baseline) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until the child runs, not a guess of how long it takes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5.0
        while sandboxed & children() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return sandboxed, sandboxed & children()

    sandboxed, alive = asyncio.run(scenario())
    assert sandboxed, "the sandboxed child should have been running"
    assert not alive


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="cpu_s"):
        Sandbox(cpu_s=0)
    with pytest.raises(ValueError, match="processes"):
        Sandbox(processes=True)
    with pytest.raises(ValueError, match="hide"):
        Sandbox(hide=["relative/path"])
    with pytest.raises(ValueError, match="allow_weak"):
        Sandbox(allow_weak="yes")  # type: ignore[arg-type]


def test_missing_bwrap_is_an_error_naming_the_tool_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(SandboxError) as info:
        Sandbox()
    message = str(info.value)
    assert "`bwrap` (bubblewrap) is not on PATH" in message
    assert "apt-get install -y bubblewrap" in message and "allow_weak: true" in message
    with caplog.at_level("WARNING", logger="rewards.sandbox"):
        weak = Sandbox(allow_weak=True)
    assert weak.isolation == "weak"
    assert "UNSAFE SANDBOX (allow_weak: true)" in caplog.text and "bubblewrap" in caplog.text
    with pytest.raises(SandboxError, match="no network barrier"):
        Sandbox(allow_weak=True, audit_hook=False)  # no `unshare` either (which() is None)


def test_a_broken_bwrap_is_reported_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: "/bin/false")
    with pytest.raises(SandboxError, match=r"`/bin/false --unshare-\w+ .*` fails here: exit 1"):
        Sandbox()


@pytest.mark.skipif(psutil.os.geteuid() != 0, reason="the cgroup is needed only as root")
def test_root_without_a_pids_cgroup_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module, "pids_cgroup", lambda: None)
    with pytest.raises(SandboxError, match="ignores RLIMIT_NPROC"):
        Sandbox()
