"""SGLangClient against a real embedded-engine server on 127.0.0.1: output mapping, named
errors, retries on connection errors, control calls, and SGLang's tensor payload format."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.multiprocessing as mp

from models import build_weight_update
from rollout.embedded import EmbeddedEngine
from rollout.http_client import (
    EngineHTTPError,
    SGLangClient,
    expand_weight_versions,
    serialize_named_tensors,
)
from rollout.server import ServerThread, free_port, make_state
from rollout.server.tensor_payload import decode_named_tensors
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import (
    greedy_reference,
    model_logprobs,
    slowed,
    tiny_model,
    wait_until,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def served(model):
    engine = EmbeddedEngine(model, max_running=16, context_len=128, eos_token_ids=[])
    with ServerThread(make_state(engine, "tiny-in-process", no_auth=True)) as server:
        yield server, engine
    engine.shutdown()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


async def _with_client(url: str, fn, **kw):
    async with SGLangClient(url, **kw) as client:
        return await fn(client)


def test_generate_maps_sglang_json_to_outputs(served, model):
    requests = [
        GenerateRequest([1, 2, 3], greedy(6), rid="r1"),
        GenerateRequest([4, 5], SamplingParams(max_new_tokens=5, n=3, sampling_seed=4), rid="r2"),
        GenerateRequest([9], greedy(4), return_logprob=False),
    ]
    outs = asyncio.run(_with_client(served[0].url, lambda c: c.generate(requests)))
    assert [o.rid for o in outs[:4]] == ["r1", "r2_0", "r2_1", "r2_2"]
    assert outs[0].output_ids == greedy_reference(model, [1, 2, 3], 6)
    assert outs[0].prompt_ids == [1, 2, 3] and outs[0].finish_reason == "length"
    assert outs[0].versions == [0] * 6 and outs[0].text is None
    for out in outs[1:4]:
        assert out.prompt_ids == [4, 5] and len(out.output_ids) == 5
        ref = model_logprobs(model, [4, 5], out.output_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=2e-5, rtol=0)
    assert outs[4].logprobs == [] and len(outs[4].output_ids) == 4


def test_http_errors_name_server_route_rid_and_status(served):
    bad = [GenerateRequest(list(range(120)), greedy(20), rid="too-long")]
    with pytest.raises(EngineHTTPError) as info:
        asyncio.run(_with_client(served[0].url, lambda c: c.generate(bad)))
    err = info.value
    assert (err.server, err.route, err.rid, err.status) == (
        served[0].url,
        "/generate",
        "too-long",
        400,
    )
    assert "maximum context length" in err.message
    for part in (served[0].url, "/generate", "too-long", "400", "maximum context length"):
        assert part in str(err)


def test_connection_errors_are_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineHTTPError) as info:
        asyncio.run(_with_client(url, lambda c: c.model_info(), retries=2, backoff=0.01))
    assert "connection failed after 3 tries" in str(info.value) and url in str(info.value)
    assert info.value.route == "/model_info" and info.value.status is None


def test_retry_reaches_a_server_that_comes_up_late(model):
    port = free_port()
    engine = EmbeddedEngine(model, max_running=2, context_len=32, eos_token_ids=[])
    server = ServerThread(make_state(engine, "late", no_auth=True), port=port)
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        client_kw = {"retries": 10, "backoff": 0.05}  # backoff totals ~51 s: ample for startup
        info = asyncio.run(_with_client(server.url, lambda c: c.model_info(), **client_kw))
        assert info["weight_version"] == "0"
    finally:
        starter.join()
        server.stop()
        engine.shutdown()


def test_control_calls(served):
    server, engine = served
    with slowed(engine):
        _control_calls(server, engine)


def _control_calls(server, engine):

    async def scenario(c: SGLangClient):
        assert await c.health() and await c.health_generate()
        assert (await c.server_info())["max_running_requests"] == 16
        task = asyncio.create_task(c.generate([GenerateRequest([3, 3], greedy(100), rid="long")]))
        await wait_until(lambda: any(s.rid == "long" for s in engine.sched.running))
        await c.pause_generation("in_place")
        with pytest.raises(EngineHTTPError) as busy:
            await c.flush_cache()
        await c.continue_generation()
        await c.abort_request("long")
        (aborted,) = await task
        await c.flush_cache()
        await c.update_weight_version("5", abort_all_requests=True)
        return busy.value, aborted, await c.weight_version()

    busy, aborted, version = asyncio.run(_with_client(server.url, scenario))
    assert busy.status == 400 and busy.route == "/flush_cache"
    assert aborted.finish_reason == "abort" and len(aborted.output_ids) < 100
    assert version == "5"
    asyncio.run(_with_client(server.url, lambda c: c.update_weight_version("0")))


def test_update_weights_from_tensor_through_the_client(served, model):
    server, engine = served
    mp.set_sharing_strategy("file_system")
    before = {n: t.clone() for n, t in model.hf_state_dict()}
    named = [(n, t * 0.5) for n, t in before.items() if n.endswith("self_attn.o_proj.weight")]
    assert len(named) == 3

    async def update(c: SGLangClient, tensors, version: str):
        await c.begin_weight_update()
        result = await c.update_weights_from_tensor(
            [serialize_named_tensors(tensors)], weight_version=version
        )
        await c.end_weight_update()
        return result, await c.weight_version()

    result, version = asyncio.run(_with_client(server.url, lambda c: update(c, named, "2")))
    assert result["success"] is True and version == "2"
    after = dict(model.hf_state_dict())
    for name, tensor in named:
        torch.testing.assert_close(after[name], tensor)
    untouched = [n for n in before if n not in dict(named)]
    assert all(torch.equal(after[n], before[n]) for n in untouched)
    restore = [(n, before[n]) for n, _ in named]
    asyncio.run(_with_client(server.url, lambda c: update(c, restore, "0")))
    assert all(torch.equal(t, before[n]) for n, t in model.hf_state_dict())


def test_weight_update_extension_through_the_client(served, model):
    server, _ = served
    before = [(n, t.clone()) for n, t in model.hf_state_dict()]
    other = tiny_model(seed=8)
    update = build_weight_update(other.hf_state_dict(), version=4, dtype=torch.float32)

    async def scenario(c: SGLangClient):
        await c.begin_weight_update()
        result = await c.update_weights_from_weight_update(update)
        await c.end_weight_update()
        version = await c.weight_version()
        out = await c.generate([GenerateRequest([6, 2], greedy(5))])
        await c.begin_weight_update()  # restore the module's model for the other tests
        await c.update_weights_from_tensor([serialize_named_tensors(before)], weight_version="0")
        await c.end_weight_update()
        return result, version, out[0]

    mp.set_sharing_strategy("file_system")
    result, version, out = asyncio.run(_with_client(server.url, scenario))
    assert result["success"] is True and version == "4"
    assert out.output_ids == greedy_reference(other, [6, 2], 5) and out.versions == [4] * 5


def test_serialize_named_tensors_is_sglang_format_and_round_trips():
    mp.set_sharing_strategy("file_system")
    named = [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(6, 4)),
        ("model.norm.weight", torch.randn(4).to(torch.bfloat16)),
        ("x.weight", torch.randn(2, 3).to(torch.float8_e4m3fn)),
        ("x.weight_scale_inv", torch.rand(1, 1)),
        ("view", torch.arange(10.0)[2:7]),
    ]
    payload = serialize_named_tensors(named)
    assert isinstance(payload, str)
    decoded = decode_named_tensors(payload)
    assert [n for n, _ in decoded] == [n for n, _ in named]
    for (_, got), (_, want) in zip(decoded, named):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_weight_versions_spans_expand_per_token():
    meta = {
        "weight_version": "4",
        "weight_versions": [
            {"version": "default", "start": 0, "end": 2},
            {"version": "3", "start": 2, "end": 3},
            {"version": "4", "start": 3, "end": 5},
        ],
    }
    assert expand_weight_versions(meta, 5) == [0, 0, 3, 4, 4]
    assert expand_weight_versions({"weight_version": "7"}, 3) == [7, 7, 7]
    with pytest.raises(ValueError, match="weight_version"):
        expand_weight_versions({"weight_version": "v-abc"}, 1)


def test_client_timeout_is_reported_with_route(served):
    server, _ = served

    async def scenario(c: SGLangClient):
        await c.pause_generation("in_place")  # nothing can finish: the timeout must fire
        async with SGLangClient(server.url, timeout=0.2) as impatient:
            with pytest.raises(EngineHTTPError) as info:
                await impatient.generate([GenerateRequest([1], greedy(20), rid="slow")])
        await c.continue_generation()
        await c.abort_request(abort_all=True)
        return info.value

    err = asyncio.run(_with_client(server.url, scenario))
    assert "Timeout" in str(err) and err.rid == "slow" and err.route == "/generate"
