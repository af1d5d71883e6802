"""SGLangEngine against ONE real SGLang 0.5.23 server on this CPU (tiny GLM-4-MoE, fp32),
launched from a job config as `rollout.engine: sglang` does: generation and logprobs checked
against our own model, every weight-sync path (outputs change to exactly what the pushed
weights give, the version bumps), pause and abort mid-generation, sglang-router in front of
the server, and a crash (SIGKILL) -> failed health check -> restart -> weights re-sent before
the worker serves again. The module's teardown checks a clean SIGTERM stop."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from configs.loader import load_job
from rollout.sglang.engine import SGLangEngine, launch_sglang_engine
from rollout.sglang.router import SGLangRouter
from rollout.sglang.server import SGLangServer, free_port
from rollout.sglang.weight_sync import make_weight_sync
from rollout.sglang.worker import Worker
from rollout.types import GenerateRequest, SamplingParams

from .conftest import (
    PROMPTS,
    assert_greedy,
    make_update,
    model_with,
    perturbed,
    reference_logprobs,
    run,
)

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(400)]
CONFIGS = Path(__file__).resolve().parents[3] / "configs"
NEW_TOKENS = 8
_versions = itertools.count(1)


@pytest.fixture(scope="module")
def server(sglang_env, tiny_glm_dir: Path, run_dir: Path):
    """The server of `rollout.engine: sglang` as a rollout worker launches it from a job."""
    torch.set_num_threads(1)
    job = load_job(
        CONFIGS / "toy_grpo.yaml",
        [
            "rollout.engine=sglang",
            f"run_dir={run_dir}",
            "rollout.max_context=512",
            "rollout.sglang.dtype=float32",
            "rollout.sglang.base_port=0",
            f"rollout.sglang.python={sglang_env.python}",
        ],
    )
    engine = launch_sglang_engine(job, tiny_glm_dir, name="rollout-0")
    (worker,) = engine.workers
    srv = worker.server
    print(f"sglang server start-up: {srv.startup_seconds:.1f} s")
    yield srv
    pgid = srv.pid
    engine.shutdown()  # SIGTERM; the whole process group must be gone
    left = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(pgid)], capture_output=True)
    if srv.is_running() or _group_alive(pgid):
        raise AssertionError(f"server not stopped cleanly: {left.stdout.decode()}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_job_config_maps_to_server_flags(server, run_dir: Path):
    args = server.args
    assert (args.dtype, args.context_length, args.random_seed) == ("float32", 512, 0)
    assert args.max_total_tokens == 64 * 512  # rollout.max_running x rollout.max_context
    assert args.cpu and server.log_path.parent == run_dir / "logs"
    assert "Uvicorn running" in server.log_path.read_text()


def engine_for(server: SGLangServer, sync: str = "tensor", router=None, **options):
    from rollout.sglang.engine import SGLangEngine

    if sync == "disk":
        options.setdefault("staging_dir", Path(server.log_path).parent / "weights")
    return SGLangEngine(
        [Worker.for_server(server)], weight_sync=make_weight_sync(sync, **options), router=router
    )


def greedy(n: int = NEW_TOKENS, **kw) -> list[GenerateRequest]:
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)
    return [GenerateRequest(input_ids=p, sampling=params) for p in PROMPTS]


def check_against(model, outputs, version: int) -> None:
    for prompt, out in zip(PROMPTS, outputs):
        assert_greedy(model, prompt, out.output_ids, NEW_TOKENS)  # tie-tolerant: another backend
        want = reference_logprobs(model, prompt, out.output_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=2e-4, rtol=0)
        assert out.versions == [version] * NEW_TOKENS
        assert out.finish_reason == "length"


def test_generate_matches_our_model_after_loading_its_weights(server, reference_model):
    """Push our model's own weights (fp32, several buckets), then SGLang's greedy tokens and
    logprobs must be what our model computes."""

    async def body():
        engine = engine_for(server)
        version = next(_versions)
        try:
            update = make_update(list(reference_model.hf_state_dict()), version)
            assert len(update.buckets) > 1
            await engine.update_weights(update)
            assert await engine.weight_version() == version
            outputs = await engine.generate(greedy())
        finally:
            await engine.close()
        check_against(reference_model, outputs, version)
        assert [o.prompt_ids for o in outputs] == PROMPTS

    run(body())


@pytest.mark.parametrize(
    ("path", "flattened"),
    [("tensor", True), ("tensor", False), ("distributed", True), ("distributed", False)],
)
def test_update_paths_change_outputs_and_version(server, reference_model, path, flattened):
    """Each in-session path loads perturbed weights: outputs become exactly those of the
    perturbed model and every output token carries the new version."""

    async def body():
        engine = engine_for(server, path, flattened=flattened)
        try:
            before = await engine.generate(greedy())
            named = perturbed(reference_model, seed=next(_versions) * 7)
            target = model_with(named, reference_model)
            version = next(_versions)
            await engine.update_weights(make_update(named, version))
            assert await engine.weight_version() == version
            after = await engine.generate(greedy())
        finally:
            await engine.close()
        assert [o.output_ids for o in after] != [o.output_ids for o in before]
        check_against(target, after, version)

    run(body())


def test_disk_path_and_pruned_versions(server, reference_model):
    async def body():
        engine = engine_for(server, "disk", keep=1)
        try:
            named = perturbed(reference_model, seed=991)
            version = next(_versions)
            await engine.update_weights(make_update(named, version))
            after = await engine.generate(greedy())
            staged = sorted(p.name for p in engine.sync.staging_dir.iterdir())
        finally:
            await engine.close()
        check_against(model_with(named, reference_model), after, version)
        assert staged == [f"v{version}"]

    run(body())


async def seconds_per_token(engine) -> float:
    """This server's decode time per token right now (the machine's load varies), so the
    pause tests can act a fixed fraction of the way through a long request."""
    req = GenerateRequest([5, 6, 7], SamplingParams(max_new_tokens=64, ignore_eos=True))
    started = time.monotonic()
    await engine.generate([req])
    return (time.monotonic() - started) / 64


def test_pause_abort_and_abort_by_rid(server):
    """pause(abort) ends running requests with finish_reason abort and their partial tokens;
    abort(rid) ends only that request; generation works again after resume."""
    long = SamplingParams(max_new_tokens=500, temperature=1.0, ignore_eos=True, sampling_seed=1)

    async def body():
        engine = engine_for(server)
        pause_after = 0.2 * 500 * await seconds_per_token(engine)

        async def started(engine) -> None:  # decoding under way, a fifth of the way through
            await asyncio.sleep(pause_after)

        try:
            task = asyncio.create_task(engine.generate([GenerateRequest([5, 6, 7], long)]))
            await started(engine)
            await engine.pause("abort")
            (paused_out,) = await asyncio.wait_for(task, 60)
            await engine.resume()

            keep = GenerateRequest([5, 6, 7], SamplingParams(max_new_tokens=24, ignore_eos=True))
            drop = GenerateRequest([8, 9], long, rid="drop-me")
            task = asyncio.create_task(engine.generate([keep, drop]))
            await started(engine)
            await engine.abort(["drop-me"])
            kept, dropped = await asyncio.wait_for(task, 60)
        finally:
            await engine.close()
        assert paused_out.finish_reason == "abort"
        assert 0 < len(paused_out.output_ids) < 500
        assert len(paused_out.logprobs) == len(paused_out.output_ids)
        assert dropped.rid == "drop-me" and dropped.finish_reason == "abort"
        assert 0 < len(dropped.output_ids) < 500
        assert kept.finish_reason == "length" and len(kept.output_ids) == 24

    run(body())


def test_pause_retract_resumes_to_completion(server):
    """pause(retract) parks requests; after resume they finish with every token."""

    async def body():
        engine = engine_for(server)
        req = GenerateRequest([5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
        wait = 0.2 * 400 * await seconds_per_token(engine)
        try:
            task = asyncio.create_task(engine.generate([req]))
            await asyncio.sleep(wait)
            await engine.pause("retract")
            await asyncio.sleep(2 * wait)
            parked = not task.done()
        finally:
            await engine.resume()  # never leave the shared server paused for later tests
        try:
            (out,) = await asyncio.wait_for(task, 120)
        finally:
            await engine.close()
        assert parked, "the request finished while the server was paused"
        assert out.finish_reason == "length" and len(out.output_ids) == 400

    run(body())


def test_router_in_front_routes_generate(server, run_dir: Path):
    router = SGLangRouter(port=free_port(), log_path=run_dir / "router.log", policy="round_robin")
    router.start()
    try:
        worker_id = router.add_worker(server.url)
        listed = router.list_workers()
        assert [w["url"] for w in listed] == [server.url] and worker_id

        async def body():
            engine = engine_for(server, router=router)
            try:
                routed = await engine.generate(greedy())
                direct = await engine.workers[0].client.generate(greedy())
                healthy = await engine.health()
            finally:
                await engine.close()
            return routed, direct, healthy

        routed, direct, healthy = run(body())
        assert [o.output_ids for o in routed] == [o.output_ids for o in direct]
        for r, d in zip(routed, direct):  # batch composition moves fp32 sums by ~1e-6
            torch.testing.assert_close(r.logprobs, d.logprobs, atol=1e-4, rtol=0)
        assert healthy
        router.remove_worker(server.url)
        assert router.list_workers() == []
    finally:
        router.stop()
    assert not router.is_running()


def test_crash_health_restart_resync(server, reference_model, run_dir: Path):
    """Weights go over the distributed (gloo) path, so the restart also drops the broken
    process group and builds a new one with the restarted server."""
    router = SGLangRouter(port=free_port(), log_path=run_dir / "router2.log", policy="round_robin")
    router.start()
    try:
        router.add_worker(server.url)
        first_pid = server.pid
        version = next(_versions)

        async def body():
            sync = make_weight_sync("distributed")
            engine = SGLangEngine([Worker.for_server(server)], weight_sync=sync, router=router)
            try:
                named = perturbed(reference_model, seed=5)
                await engine.update_weights(make_update(named, version))
                before = await engine.generate(greedy())
                assert await engine.check_and_restart() == []  # healthy: nothing to do
                server.kill()  # a crash: every process of the server dies at once
                assert not _group_alive(first_pid)
                assert not await engine.health()
                restarted = await engine.check_and_restart()
                after = await engine.generate(greedy())
                served, healthy = await engine.weight_version(), await engine.health()
                return before, restarted, after, served, healthy
            finally:
                await engine.close()

        before, restarted, after, served, healthy = run(body())
        assert restarted == [server.url] and server.pid != first_pid and healthy
        assert served == version  # re-synced before serving: not the checkpoint's weights
        assert [o.output_ids for o in after] == [o.output_ids for o in before]
        assert all(o.versions == [version] * NEW_TOKENS for o in after)
        assert [w["url"] for w in router.list_workers()] == [server.url]
        assert server.log_path.read_text().count("===== physarum: starting") >= 2
    finally:
        router.stop()
