"""SGLang server ports: a port one launch is starting a server on is not picked by another
launch (same process or another), a bound port is skipped, the listener check tells our
server from another process's, and two real SGLang launches at once get one server each."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from configs.services import SGLangConfig
from rollout.sglang.launch import _pick_port, start_servers
from rollout.sglang.ports import free_port, listener_owned_by

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[3]


def _pick_in_another_process(base_port: int) -> int:
    code = (
        "from configs.services import SGLangConfig\n"
        "from rollout.sglang.launch import _pick_port\n"
        f"print(_pick_port(SGLangConfig(base_port={base_port}, host='{HOST}'), 0).port)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_a_port_being_launched_on_is_not_picked_by_another_launch():
    base = free_port(HOST)
    cfg = SGLangConfig(base_port=base, host=HOST)
    first = _pick_port(cfg, 0)
    try:
        assert first.port == base  # free: the configured port
        second = _pick_port(cfg, 0)  # the server on `base` has not bound it yet
        assert second.port != base
        second.release()
        assert _pick_in_another_process(base) != base  # another job on this machine
    finally:
        first.release()
    again = _pick_port(cfg, 0)  # handed over: the port is free for the next launch
    assert again.port == base
    again.release()


def test_a_port_with_a_listening_socket_is_skipped():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        taken = sock.getsockname()[1]
        picked = _pick_port(SGLangConfig(base_port=taken, host=HOST), 0)
        picked.release()
    assert picked.port != taken


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # answers /health 200 like any SGLang server would
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_listener_check_tells_our_server_from_another_process():
    port = free_port(HOST)
    assert listener_owned_by(1, port) is None  # nobody listens: cannot tell
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", HOST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as an SGLang server gets
    )
    try:
        while listener_owned_by(server.pid, port) is None:  # until it listens
            assert server.poll() is None, "http.server exited"
            time.sleep(0.1)
        assert listener_owned_by(server.pid, port) is True
        other = subprocess.Popen(["sleep", "30"], start_new_session=True)
        try:  # a launched process that is not the one listening
            assert listener_owned_by(other.pid, port) is False
        finally:
            other.kill()
            other.wait()
    finally:
        server.terminate()
        server.wait()
    # a listener in this (test) process, the "other job": not the server's group
    with http.server.ThreadingHTTPServer((HOST, 0), _Health) as foreign:
        thread = threading.Thread(target=foreign.serve_forever, daemon=True)
        thread.start()
        port = foreign.server_address[1]
        assert httpx.get(f"http://{HOST}:{port}/health").status_code == 200
        assert listener_owned_by(server.pid, port) is False
        foreign.shutdown()


@pytest.mark.slow
@pytest.mark.sglang
def test_two_sglang_launches_at_once_get_one_server_each(sglang_env, tiny_glm_dir, run_dir):
    """Two launches with the same base_port and index, started together (two jobs, or two
    rollout workers named alike): each gets its own port and the server there is its own."""
    base = free_port(HOST)
    cfg = SGLangConfig(base_port=base, host=HOST, python=str(sglang_env.python), dtype="float32")

    def launch(tag: str):
        return start_servers(
            cfg,
            model_path=tiny_glm_dir,
            run_dir=run_dir / tag,
            max_total_tokens=2048,
            context_length=256,
            extra_args=["--skip-tokenizer-init"],
        )[0]

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(launch, tag) for tag in ("a", "b")]
    servers = [f.result() for f in futures if f.exception() is None]  # all done here
    try:
        for f in futures:
            f.result()  # a failed launch's error, once both servers are known
        ports = sorted(s.args.port for s in servers)
        assert len(set(ports)) == 2 and base in ports
        for server in servers:
            assert listener_owned_by(server.pid, server.args.port) is True
            info = httpx.get(f"{server.url}/server_info", timeout=30).json()
            assert info["port"] == server.args.port
    finally:
        for server in servers:
            server.stop()
