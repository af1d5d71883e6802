"""Server lifecycle on a real SGLang server: its log in the run directory, a crash (SIGKILL of
the whole process group) seen by the health check, a restart that re-sends the newest weights
before the worker serves again behind the router, and a clean SIGTERM stop. Weights go over
the distributed (gloo) path, so the restart also has to drop the broken process group and
build a new one with the restarted server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from rollout.sglang.engine import SGLangEngine
from rollout.sglang.router import SGLangRouter
from rollout.sglang.server import free_port
from rollout.sglang.weight_sync import make_weight_sync
from rollout.sglang.worker import Worker
from rollout.types import GenerateRequest, SamplingParams

from .conftest import PROMPTS, make_update, perturbed, run, start_server

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(600)]


def _greedy() -> list[GenerateRequest]:
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    return [GenerateRequest(input_ids=p, sampling=params) for p in PROMPTS]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_crash_health_restart_resync_then_clean_stop(
    sglang_env, tiny_glm_dir: Path, reference_model, run_dir: Path
):
    torch.set_num_threads(1)
    server = start_server(sglang_env, tiny_glm_dir, run_dir)
    router = SGLangRouter(port=free_port(), log_path=run_dir / "router.log", policy="round_robin")
    try:
        router.start()
        router.add_worker(server.url)
        first_pid = server.pid

        async def body():
            sync = make_weight_sync("distributed")
            engine = SGLangEngine([Worker.for_server(server)], weight_sync=sync, router=router)
            try:
                await engine.update_weights(make_update(perturbed(reference_model, seed=5), 4))
                before = await engine.generate(_greedy())
                assert await engine.check_and_restart() == []  # healthy: nothing to do

                server.kill()  # a crash: every process of the server dies at once
                assert not await engine.health()
                restarted = await engine.check_and_restart()
                after = await engine.generate(_greedy())
                version = await engine.weight_version()
                healthy = await engine.health()
            finally:
                await engine.close()
            return before, restarted, after, version, healthy

        before, restarted, after, version, healthy = run(body())
        assert restarted == [server.url] and server.pid != first_pid and healthy
        assert version == 4  # re-synced before serving: not the checkpoint's weights
        assert [o.output_ids for o in after] == [o.output_ids for o in before]
        assert all(o.versions == [4] * 8 for o in after)
        assert [w["url"] for w in router.list_workers()] == [server.url]
        log = server.log_path.read_text()
        assert log.count("===== physarum: starting") == 2 and "fired up" in log
    finally:
        router.stop()
        pgid = server.pid
        code = server.stop()
    assert code is not None and not server.is_running()
    left = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(pgid)], capture_output=True)
    assert pgid is not None and not _group_alive(pgid), left.stdout.decode()
