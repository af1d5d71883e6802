"""Access (issue 18 item 2): every server a job or a user starts refuses a client without its
secret, and the run dir keeps the secrets to its owner.

- the embedded redis-server always has a password (the job's, or a random one): a client
  without it is refused, whoever started the server;
- the engine server needs an API key on every route but the probes, /v1/* and the
  weight-update routes included; serving without one is an explicit opt-out that is refused
  on anything but a loopback bind, before anything binds or loads;
- run dirs are 0700, the Redis password and config 0600.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from buffer.redis_server import EmbeddedRedis
from configs import load_job
from models import save_pretrained
from physarum.cli import main
from physarum.rundir import RunDir
from physarum.services.buffer_service import BufferService
from rollout.server import ServerThread, build_app, load_engine, make_state
from rollout.server.auth import EngineAuthError, check_access
from tests.rollout.engine_helpers import tiny_model

torch.set_num_threads(1)
KEY = "k3y-for-tests"
PROBES = ("/health", "/health_generate", "/ready", "/metrics")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _anonymous(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


def test_embedded_redis_without_a_password_argument_still_requires_one(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert server.password and f":{server.password}@127.0.0.1:" in server.url
        with pytest.raises(redis.AuthenticationError):
            _anonymous(server.port).get("x")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url.replace(server.password, "guess")).ping()
        assert redis.Redis.from_url(server.url).ping()
        assert _mode(tmp_path / "redis") == 0o700
        assert _mode(tmp_path / "redis" / "redis.conf") == 0o600


def test_the_jobs_buffer_refuses_a_client_without_the_password(tmp_path: Path) -> None:
    job = load_job(Path("configs/toy_grpo.yaml"), [f"run_dir={tmp_path / 'run'}"])
    run = RunDir(tmp_path / "run").create()
    buffer = BufferService(job, run)  # the single-node path: the driver runs redis-server
    try:
        port = int(buffer.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            _anonymous(port).ping()
        assert run.redis_password.read_text() in buffer.url
        assert _mode(run.redis_password) == 0o600
        for private in (run.root, run.redis, run.checkpoints, run.root / "data", run.logs):
            assert _mode(private) == 0o700, private
    finally:
        buffer.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny")
    save_pretrained(tiny_model(), path)
    engine = load_engine(path, max_running=4, context_len=64)
    yield engine
    engine.shutdown()


def _guarded_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves but the probes (from its OpenAPI
    schema, which lists the routes of every included router), and the schema pages."""
    found = [("GET", "/openapi.json"), ("GET", "/docs")]
    for path, methods in app.openapi()["paths"].items():
        if not path.startswith(PROBES):
            found += [(method.upper(), path) for method in sorted(methods)]
    return found


@pytest.mark.filterwarnings("ignore:Duplicate Operation ID")  # FastAPI, on an alias route
def test_every_engine_route_refuses_a_client_without_the_key(engine) -> None:
    state = make_state(engine, "tiny", api_key=KEY)
    routes = _guarded_routes(build_app(state))
    paths = {path for _, path in routes}
    for needed in (
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/update_weights_from_tensor",
        "/update_weights_from_disk",
    ):
        assert needed in paths, needed  # the list below covers what matters most
    assert len(routes) >= 20  # every SGLang and OpenAI route
    with ServerThread(state) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path in routes:
            url = path.replace("{model}", "tiny")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                reply = c.request(method, url, json={}, headers=headers)
                assert reply.status_code == 401, (method, path, headers, reply.text)
                if path.startswith("/v1/"):  # OpenAI's error shape for OpenAI clients
                    assert reply.json()["error"]["code"] == "invalid_api_key"
                else:
                    assert reply.json() == {"error": "Unauthorized"}
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        assert c.get("/model_info", headers=auth).status_code == 200
        assert c.get("/health").status_code == 200  # probes stay open, as SGLang's


def test_a_server_without_a_key_is_refused_unless_opted_out_on_loopback(engine) -> None:
    with pytest.raises(EngineAuthError, match="needs an API key: pass --api-key KEY"):
        make_state(engine, "tiny")
    for host in ("0.0.0.0", "10.1.2.3", "::", "node7.cluster"):
        with pytest.raises(EngineAuthError, match=f"only allowed on a loopback bind.*{host}"):
            make_state(engine, "tiny", no_auth=True, host=host)
    opted_out = make_state(engine, "tiny", no_auth=True)  # 127.0.0.1
    with pytest.raises(EngineAuthError, match="only allowed on a loopback bind"):
        ServerThread(opted_out, host="0.0.0.0")  # the bind is checked, whatever the state says
    keyless = make_state(engine, "tiny", api_key=KEY)
    keyless.api_key = None
    with pytest.raises(EngineAuthError, match="no api_key and did not opt out"):
        build_app(keyless)
    with pytest.raises(EngineAuthError, match="empty key is no key"):
        check_access("  ", False, "127.0.0.1")
    with pytest.raises(EngineAuthError, match="not both"):
        check_access(KEY, True, "127.0.0.1")
    check_access(None, True, "::1")
    check_access(KEY, False, "0.0.0.0")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host", "0.0.0.0"], "needs an API key: pass --api-key KEY"),
        (["--host", "0.0.0.0", "--no-auth"], "--no-auth is only allowed on a loopback bind"),
        (["--no-auth", "--api-key", KEY], "not both"),
    ],
)
def test_serve_engine_refuses_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    missing = tmp_path / "no-such-model"  # a load would fail differently: nothing is loaded
    os.environ.pop("PHYSARUM_ENGINE_API_KEY", None)
    assert main(["serve-engine", "--model", str(missing), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not missing.exists()


def test_run_dir_secrets_are_0600_made_once_and_reused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").create()
    key = run.secret("sglang_api_key")  # the job's SGLang servers get this key
    path = run.root / "secrets" / "sglang_api_key"
    assert len(key) >= 32 and _mode(path) == 0o600 and _mode(path.parent) == 0o700
    path.chmod(0o644)  # e.g. restored from a backup with looser bits
    assert RunDir(run.root).secret("sglang_api_key") == key and _mode(path) == 0o600
    assert run.secret("other") != key
