"""A truncated AOF stops the buffer's start instead of losing its tail without a word
(`aof-load-truncated no`, issue 18 item 3), and the way out the error names works."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import redis

from buffer.redis_server import AOFTruncatedError, EmbeddedRedis, find_redis_server
from tests.buffer.helpers import wait_aof_written


def _aof_files(data_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((data_dir / "appendonlydir").iterdir())
    }


def _write_and_crash(data_dir: Path, n: int) -> str:
    server = EmbeddedRedis(data_dir)
    url = server.start()
    client = redis.Redis.from_url(url)
    for i in range(n):
        client.set(f"k{i}", "x" * 50)
    client.close()
    # everysec may postpone the AOF write while a background fsync runs (a loaded disk):
    # a kill before the write would lose the keys this test expects back
    wait_aof_written(url)
    server.kill()  # as a crash: the AOF is what was written
    return server.password


def test_a_truncated_aof_is_refused_naming_the_file_and_the_way_out(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    password = _write_and_crash(data_dir, 20)
    (incr,) = (data_dir / "appendonlydir").glob("*.incr.aof")
    incr.write_bytes(incr.read_bytes()[:-9])  # the last command is cut in the middle
    before = _aof_files(data_dir)

    with pytest.raises(AOFTruncatedError) as refused:
        EmbeddedRedis(data_dir, password=password).start()
    message = str(refused.value)
    manifest = data_dir / "appendonlydir" / "appendonly.aof.manifest"
    assert f"AOF in {data_dir} is truncated" in message
    assert f"redis-check-aof --fix {manifest}" in message and "--overwrite" in message
    assert "appendonly.aof.1.incr.aof" in message  # redis-server's own line, naming the file
    assert _aof_files(data_dir) == before  # nothing loaded, nothing rewritten
    assert isinstance(refused.value, ValueError)  # the CLI prints it as one line

    # the way out: redis-check-aof cuts the broken command; the rest is served again
    check = Path(find_redis_server()).with_name("redis-check-aof")
    fixed = subprocess.run(
        [str(check), "--fix", str(manifest)], input="y\n", capture_output=True, text=True
    )
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    with EmbeddedRedis(data_dir, password=password) as server:
        client = redis.Redis.from_url(server.url)
        assert client.get("k18") == b"x" * 50 and client.get("k19") is None
        assert client.config_get("aof-load-truncated") == {"aof-load-truncated": "no"}
        client.close()


def test_an_intact_aof_after_a_crash_loads_everything(tmp_path: Path) -> None:
    password = _write_and_crash(tmp_path / "redis", 5)
    with EmbeddedRedis(tmp_path / "redis", password=password) as server:
        client = redis.Redis.from_url(server.url)
        assert [client.get(f"k{i}") for i in range(5)] == [b"x" * 50] * 5
        client.close()
