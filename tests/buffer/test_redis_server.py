"""The embedded redis-server launcher: AOF resume, passwords, TLS, and its error messages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from buffer import redis_server
from buffer.redis_server import EmbeddedRedis, RedisServerError, RedisTLS
from buffer.store import EpisodeStore, redact
from tests.buffer.helpers import make_group


def test_restart_on_the_same_data_dir_reloads_the_aof(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    assert url.startswith("redis://:") and "@127.0.0.1:" in url  # always a password
    client = redis.Redis.from_url(url)
    config = client.config_get("*")
    assert (config["appendonly"], config["appendfsync"], config["bind"]) == (
        "yes",
        "everysec",
        "127.0.0.1",
    )
    assert config["aof-load-truncated"] == "no"
    assert Path(config["dir"]) == (tmp_path / "redis").resolve()
    client.set("kept", "1")
    client.close()
    pid = server.pid
    server.stop()
    assert not server.running and not Path(f"/proc/{pid}").exists()

    client = redis.Redis.from_url(server.start())  # resume: a new port, the same data
    assert client.get("kept") == b"1"
    client.close()
    server.stop()


def test_a_second_server_on_a_running_data_dir_is_refused(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        with pytest.raises(RedisServerError, match=rf"pid {first.pid}\) is already running"):
            EmbeddedRedis(tmp_path).start()
        assert redis.Redis.from_url(first.url).ping()


def test_missing_binary_names_the_install_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(redis_server, "_CANDIDATES", ("no-such-redis-server",))
    with pytest.raises(RedisServerError, match=r"apt-get install -y redis-server"):
        EmbeddedRedis(tmp_path).start()


def test_password_url_works_and_a_wrong_password_is_refused(tmp_path: Path) -> None:
    password = 'p@ss:w/rd#"x'  # characters that must be percent-encoded in a URL
    with EmbeddedRedis(tmp_path, password=password) as server:
        assert "%40" in server.url and password not in server.url
        with EpisodeStore(server.url, "pw") as store:
            store.set_version(3)
            assert store.put_group(make_group("p0", version=3)) is not None
            taken = store.take_groups("c", 1, block_ms=0)
            assert [t.group.prompt_id for t in taken] == ["p0"]
        wrong = server.url.replace(server.url.split("@")[0], "redis://:wrong")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(wrong).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0)).get("x")


def _self_signed(tmp_path: Path) -> RedisTLS:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return RedisTLS(cert_file=cert, key_file=key, ca_file=cert)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_rediss_url_with_password(tmp_path: Path) -> None:
    tls = _self_signed(tmp_path)
    with EmbeddedRedis(tmp_path / "data", password="s3cret", tls=tls) as server:
        assert server.url.startswith("rediss://:s3cret@127.0.0.1:")
        with EpisodeStore(server.url, "tls") as store:
            entry = store.put_group(make_group("p0"))
            assert [t.entry_id for t in store.take_groups("c", 1, block_ms=0)] == [entry]
        plain = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(plain, socket_timeout=2).ping()


def test_an_unreachable_server_is_named_without_its_password(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, password="hunter2") as server:
        port = server.port
    url = f"redis://:hunter2@127.0.0.1:{port}/0"  # stopped: nothing listens there now
    with pytest.raises(redis.ConnectionError, match=r"cannot reach Redis at redis://:\*\*\*@127"):
        EpisodeStore(url, "x")
    assert redact(url) == f"redis://:***@127.0.0.1:{port}/0"
    assert redact("rediss://user:pw@h:1/0?ssl_cert_reqs=none") == (
        "rediss://user:***@h:1/0?ssl_cert_reqs=none"
    )
