"""The embedded engine's HTTP server on a real uvicorn socket: SGLang's /generate JSON,
streaming, errors, auth, flow control and weight updates (tensor, extension, disk)."""

from __future__ import annotations

import asyncio
import base64
import json
import pickle

import httpx
import pytest
import torch
import torch.multiprocessing as mp

from envs.tasks import tokenizer_corpus
from models import build_weight_update, encode_weight_update, from_pretrained, save_pretrained
from models.tokenizer import build_toy_tokenizer
from rollout.embedded import EmbeddedEngine
from rollout.http_client import serialize_named_tensors
from rollout.server import ServerThread, load_engine, make_state
from tests.rollout.engine_helpers import (
    greedy_reference,
    model_logprobs,
    slowed,
    tiny_model,
    wait_until,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = build_toy_tokenizer(path, tokenizer_corpus(n_per_task=100), vocab_size=300)
    save_pretrained(tiny_model(vocab_size=len(tok)), path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    return from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def served(model_dir):
    engine = load_engine(model_dir, max_running=16, context_len=128)
    server = ServerThread(
        make_state(engine, str(model_dir), tokenizer_path=str(model_dir), no_auth=True)
    )
    with server:
        yield server, engine
    engine.shutdown()


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0].url, timeout=60) as client:
        yield client


def greedy(n: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **kw}


def test_generate_single_matches_model_and_sglang_shape(http, reference):
    body = {"input_ids": [5, 9, 2, 7], "sampling_params": greedy(8), "return_logprob": True}
    r = http.post("/generate", json=body)
    assert r.status_code == 200
    item = r.json()
    assert set(item) == {"text", "output_ids", "meta_info"}
    meta = item["meta_info"]
    assert item["output_ids"] == greedy_reference(reference, [5, 9, 2, 7], 8)
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == 8
    assert meta["weight_version"] == "0"
    assert meta["weight_versions"] == [{"version": "0", "start": 0, "end": 8}]
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == item["output_ids"] and all(t[2] is None for t in triples)
    ref = model_logprobs(reference, [5, 9, 2, 7], item["output_ids"])
    torch.testing.assert_close(torch.tensor([t[0] for t in triples]), ref, atol=2e-5, rtol=0)
    assert meta["e2e_latency"] > 0 and isinstance(meta["id"], str)


def test_generate_text_batch_and_n(http, served):
    tok = served[1].tokenizer
    body = {
        "text": ["1+2=", "hello"],
        "sampling_params": {"max_new_tokens": 5, "n": 3, "ignore_eos": True},
        "rid": ["a", "b"],
        "return_logprob": True,
        "return_text_in_logprobs": True,
    }
    items = http.post("/generate", json=body).json()
    assert [i["meta_info"]["id"] for i in items] == [f"{r}_{j}" for r in "ab" for j in range(3)]
    for item in items:
        assert item["text"] == tok.decode(item["output_ids"], skip_special_tokens=True)
        texts = [t[2] for t in item["meta_info"]["output_token_logprobs"]]
        assert texts == [tok.decode([t]) for t in item["output_ids"]]
    assert items[0]["meta_info"]["prompt_tokens"] == len(tok.encode("1+2="))


def test_stop_string_trims_text_and_reports_match(http, served):
    tok = served[1].tokenizer
    full = http.post("/generate", json={"input_ids": [3, 8, 1], "sampling_params": greedy(16)})
    ids = full.json()["output_ids"]
    stop = tok.decode(ids[6:8])
    assert stop.strip(), "pick a non-blank stop string"
    body = {"input_ids": [3, 8, 1], "sampling_params": greedy(16, stop=stop)}
    item = http.post("/generate", json=body).json()
    assert item["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    text_before = tok.decode(ids[: len(item["output_ids"])], skip_special_tokens=True)
    assert stop in tok.decode(item["output_ids"]) and len(item["output_ids"]) <= 8
    assert item["text"] == text_before[: text_before.find(stop)]


def test_stream_is_cumulative_sse(http):
    body = {"input_ids": [4, 4, 2], "sampling_params": greedy(6), "stream": True}
    with http.stream("POST", "/generate", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4, 5, 6]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    final = chunks[-1]["output_ids"]
    assert all(final[: len(c["output_ids"])] == c["output_ids"] for c in chunks)


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (
            {"input_ids": [1], "sampling_params": {"max_tokens": 3}},
            400,
            "unknown field `max_tokens`",
        ),
        ({"input_ids": [1], "sampling_params": {"top_p": 2.0}}, 400, "top_p"),
        (
            {"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}},
            400,
            "frequency_penalty",
        ),
        (
            {"input_ids": [1] * 120, "sampling_params": {"max_new_tokens": 9}},
            400,
            "maximum context",
        ),
        ({"input_ids": [1, 100000]}, 400, "input_ids"),
        ({"sampling_params": {}}, 400, "input_ids"),
        ({"input_ids": [1], "logprob_start_len": 0}, 400, "logprob_start_len"),
    ],
)
def test_bad_generate_requests_get_4xx_naming_the_field(http, body, status, needle):
    r = http.post("/generate", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    message = err if isinstance(err, str) else err["message"]
    assert needle in message


def test_bad_control_bodies_get_422_naming_the_field(http):
    r = http.post("/pause_generation", json={"mode": "sideways"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mode"]
    r = http.post("/update_weights_from_disk", json={})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model_path"]


def test_info_routes(http):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    for route in ("/model_info", "/get_model_info"):
        info = http.get(route).json()
        assert info["weight_version"] == "0" and info["is_generation"] is True
    for route in ("/server_info", "/get_server_info"):
        info = http.get(route).json()
        assert info["max_running_requests"] == 16 and "internal_states" in info


def test_api_key_like_sglang(served):
    engine = served[1]
    with ServerThread(make_state(engine, "m", api_key="s3cret")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            body = {"input_ids": [1, 2], "sampling_params": greedy(2)}
            assert c.post("/generate", json=body).status_code == 401
            assert c.get("/model_info").status_code == 401
            assert c.get("/health").status_code == 200  # probes stay open, as SGLang
            auth = {"Authorization": "Bearer s3cret"}
            assert c.post("/generate", json=body, headers=auth).status_code == 200
            bad = {"Authorization": "Bearer nope"}
            assert c.post("/generate", json=body, headers=bad).status_code == 401


async def _long_generate(url: str, rid: str, n: int = 100) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        body = {"input_ids": [7, 7, 7], "sampling_params": greedy(n), "rid": rid}
        return (await c.post("/generate", json=body)).json()


def _running(engine: EmbeddedEngine, rid: str, at_least: int):
    def check() -> bool:
        return any(s.rid == rid and len(s.output_ids) >= at_least for s in engine.sched.running)

    return check


@pytest.fixture
def slow_engine(served):
    with slowed(served[1]):
        yield


@pytest.mark.usefixtures("slow_engine")
def test_abort_request_and_pause_continue_over_http(served, http):
    server, engine = served

    async def scenario():
        task = asyncio.create_task(_long_generate(server.url, "victim"))
        await wait_until(_running(engine, "victim", 3))
        http.post("/abort_request", json={"rid": "victim"})
        aborted = await task
        task = asyncio.create_task(_long_generate(server.url, "held", 40))
        await wait_until(_running(engine, "held", 3))
        assert http.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
        busy = http.post("/flush_cache")
        assert http.post("/continue_generation", json={}).status_code == 200
        return aborted, busy, await task

    aborted, busy, held = asyncio.run(scenario())
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
    assert 3 <= len(aborted["output_ids"]) < 100
    assert busy.status_code == 400
    assert held["meta_info"]["finish_reason"]["type"] == "length"
    assert http.post("/flush_cache").status_code == 200  # idle now


def test_update_weights_from_tensor_needs_a_session(http):
    body = {"serialized_named_tensors": ["AAAA"], "flush_cache": False}
    r = http.post("/update_weights_from_tensor", json=body)
    assert r.status_code == 400
    assert r.json()["message"] == (
        "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
    )


def test_restricted_unpickler_refuses_arbitrary_globals(http):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    payload = base64.b64encode(pickle.dumps([("x", Evil())])).decode()
    http.post("/begin_weight_update", json={})
    try:
        body = {"serialized_named_tensors": [payload], "flush_cache": False}
        r = http.post("/update_weights_from_tensor", json=body)
    finally:
        http.post("/end_weight_update", json={})
    assert r.status_code == 400 and "system is not allowed" in r.json()["message"]


def _swap_model_weights(http, server, engine, named, version: int, partial_rid: str):
    """Partial rollout over HTTP, as slime drives SGLang: pause in place, update, continue."""

    async def scenario():
        task = asyncio.create_task(_long_generate(server.url, partial_rid, 60))
        await wait_until(_running(engine, partial_rid, 5))
        http.post("/pause_generation", json={"mode": "in_place"})
        assert http.post("/begin_weight_update", json={"selector": "all"}).json()["success"]
        refused = http.post(
            "/update_weights_from_tensor",
            json={"serialized_named_tensors": [serialize_named_tensors(named)]},
        )  # flush_cache defaults to true: refused while a request holds KV, as SGLang
        ok = http.post(
            "/update_weights_from_tensor",
            json={
                "serialized_named_tensors": [serialize_named_tensors(named)],
                "flush_cache": False,
                "weight_version": str(version),
            },
        )
        assert http.post("/end_weight_update", json={}).json()["success"]
        http.post("/continue_generation", json={})
        return refused, ok, await task

    return asyncio.run(scenario())


def test_update_weights_from_tensor_mid_generation(served, http):
    server, engine = served
    mp.set_sharing_strategy("file_system")  # CPU tensors by shared-memory file name
    new = tiny_model(seed=5, vocab_size=engine.model.config.vocab_size)
    named = list(new.hf_state_dict())
    refused, ok, partial = _swap_model_weights(http, server, engine, named, 3, "partial")
    assert refused.status_code == 400 and "flush" in refused.json()["message"]
    assert ok.status_code == 200 and ok.json()["success"] is True
    spans = partial["meta_info"]["weight_versions"]
    assert [s["version"] for s in spans] == ["0", "3"]
    assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] >= 5
    assert spans[1]["end"] == 60 and partial["meta_info"]["weight_version"] == "3"
    assert http.get("/model_info").json()["weight_version"] == "3"
    out = http.post("/generate", json={"input_ids": [2, 3], "sampling_params": greedy(6)}).json()
    assert out["output_ids"] == greedy_reference(new, [2, 3], 6)


def test_physarum_extension_and_disk_updates(served, http, model_dir, reference, tmp_path):
    engine = served[1]
    vocab = engine.model.config.vocab_size
    other = tiny_model(seed=9, vocab_size=vocab)
    update = build_weight_update(other.hf_state_dict(), version=11, dtype=torch.float32)
    field = base64.b64encode(encode_weight_update(update)).decode()
    http.post("/begin_weight_update", json={})
    r = http.post("/update_weights_from_tensor", json={"physarum_weight_update": field})
    http.post("/end_weight_update", json={})
    assert r.status_code == 200, r.text
    out = http.post("/generate", json={"input_ids": [9, 1], "sampling_params": greedy(6)}).json()
    assert out["output_ids"] == greedy_reference(other, [9, 1], 6)
    assert out["meta_info"]["weight_version"] == "11"
    # back to the original checkpoint from disk, with a new version string
    body = {"model_path": str(model_dir), "weight_version": "12"}
    r = http.post("/update_weights_from_disk", json=body)
    assert r.status_code == 200 and r.json() == {
        "success": True,
        "message": "Succeeded to update model weights.",
        "num_paused_requests": 0,
    }
    out = http.post("/generate", json={"input_ids": [9, 1], "sampling_params": greedy(6)}).json()
    assert out["output_ids"] == greedy_reference(reference, [9, 1], 6)
    r = http.post("/update_weight_version", json={"new_version": "13"})
    assert r.json() == {
        "success": True,
        "message": "Weight version updated to 13",
        "new_version": "13",
    }
    assert http.get("/model_info").json()["weight_version"] == "13"
    bad = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "none")})
    assert bad.status_code == 400 and "model_path" in bad.json()["message"]


def test_client_disconnect_aborts_the_request(served, http):
    server, engine = served
    http.post("/pause_generation", json={"mode": "in_place"})  # only an abort can remove it now
    try:
        body = {"input_ids": [6, 6], "sampling_params": greedy(20), "rid": "gone"}
        with httpx.Client(base_url=server.url, timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/generate", json=body)

        def gone() -> bool:
            return not any(s.rid == "gone" for s in (*engine.sched.running, *engine.sched.waiting))

        asyncio.run(wait_until(gone, timeout=30))
    finally:
        http.post("/continue_generation", json={})
