"""Bad inputs to the engine server (issue 18, items 5 and 8): /generate, the OpenAI routes and
weight updates, on a real uvicorn socket. Each case asserts the status code, that the
message names what is wrong and, for weight updates, that the old weights still answer."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import threading

import httpx
import pytest
import torch
import torch.multiprocessing as mp

from envs.tasks import tokenizer_corpus
from models import build_weight_update, encode_weight_update, save_pretrained
from models.tokenizer import build_toy_tokenizer
from rollout.http_client import serialize_named_tensors
from rollout.server import ServerThread, load_engine, make_state
from tests.rollout.engine_helpers import tiny_model

torch.set_num_threads(1)

MAX_N = 8
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = build_toy_tokenizer(path, tokenizer_corpus(n_per_task=100), vocab_size=300)
    save_pretrained(tiny_model(vocab_size=len(tok)), path)
    return path


@pytest.fixture(scope="module")
def served(model_dir):
    engine = load_engine(model_dir, max_running=8, context_len=128)
    state = make_state(engine, str(model_dir), tokenizer_path=str(model_dir), no_auth=True)
    state.max_n, state.max_body_bytes = MAX_N, MAX_BODY
    with ServerThread(state) as server:
        yield server, engine
    engine.shutdown()


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0].url, timeout=60) as client:
        yield client


def greedy_ids(http) -> list[int]:
    """A fixed greedy generation: equal before and after a refused update = weights kept."""
    body = {"input_ids": [5, 9, 2], "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    r = http.post("/generate", json={**body, "sampling_params": {**body["sampling_params"]}})
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def sp(**kw) -> dict:
    return {"input_ids": [5, 9, 2], "sampling_params": {"max_new_tokens": 2, **kw}}


NAN = float("nan")

# (case id, body, status, text the message must contain)
GENERATE_CASES = [
    ("temperature-nan", sp(temperature=NAN), 400, "temperature: expected a finite number"),
    ("temperature-inf", sp(temperature=math.inf), 400, "temperature: expected a finite number"),
    ("temperature-negative", sp(temperature=-1), 400, "temperature: expected a number >= 0"),
    ("top_p-zero", sp(top_p=0), 400, "top_p: expected a number in (0, 1]"),
    ("top_p-above-one", sp(top_p=1.5), 400, "top_p"),
    ("top_p-nan", sp(top_p=NAN), 400, "top_p: expected a finite number"),
    ("min_p-nan", sp(min_p=NAN), 400, "min_p: expected a finite number"),
    ("top_k-zero", sp(top_k=0), 400, "top_k"),
    ("n-zero", sp(n=0), 400, "n: expected an int >= 1"),
    ("n-bool", sp(n=True), 400, "n: expected a number, got the bool"),
    ("n-above-limit", sp(n=MAX_N + 1), 400, f"sampling_params.n: {MAX_N + 1} is above"),
    ("n-huge", sp(n=100_000), 400, "above this server's limit"),
    ("max_new_tokens-negative", sp(max_new_tokens=-1), 400, "max_new_tokens"),
    ("max_new_tokens-bool", sp(max_new_tokens=True), 400, "max_new_tokens"),
    ("stop_token_ids-bool", sp(stop_token_ids=[True]), 400, "stop_token_ids"),
    ("unknown-sampling-key", sp(temprature=0.5), 400, "unknown field `temprature`"),
    ("input_ids-bools", {"input_ids": [True, False]}, 422, "input_ids"),
    ("input_ids-out-of-vocab", {"input_ids": [5, 99999]}, 400, "token id 99999 is outside"),
    ("input_ids-negative", {"input_ids": [-1, 5]}, 400, "token id -1 is outside"),
    ("input_ids-empty", {"input_ids": []}, 400, "input_ids"),
    ("input_ids-floats", {"input_ids": [1.5, 2]}, 422, "input_ids"),
    ("batch-row-out-of-vocab", {"input_ids": [[1, 2], [3, 10**9]]}, 400, "input_ids[1]"),
    ("text-and-ids", {"text": "1+1", "input_ids": [1]}, 400, "exactly one"),
    ("neither-text-nor-ids", {"sampling_params": {}}, 400, "exactly one"),
    ("unsupported-option", {"input_ids": [1], "lora_path": "x"}, 400, "lora_path"),
    ("rid-wrong-type", {"input_ids": [[1], [2]], "rid": [1, 2]}, 422, "rid"),
]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [c[1:] for c in GENERATE_CASES],
    ids=[c[0] for c in GENERATE_CASES],
)
def test_generate_refuses(http, body, status, needle):
    r = http.post(
        "/generate", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert needle in r.text


ASK = [{"role": "user", "content": "1+1="}]

OPENAI_CASES = [
    ("chat-temperature-nan", "/v1/chat/completions", {"temperature": NAN}, 400, "temperature"),
    ("chat-temperature-3", "/v1/chat/completions", {"temperature": 3}, 400, "temperature"),
    ("chat-top_p-0", "/v1/chat/completions", {"top_p": 0}, 400, "top_p"),
    ("chat-n-above-limit", "/v1/chat/completions", {"n": MAX_N + 1}, 400, "above this server"),
    ("chat-n-1000", "/v1/chat/completions", {"n": 1000}, 400, "n"),
    ("chat-no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat-logit-bias", "/v1/chat/completions", {"logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("chat-unknown-key", "/v1/chat/completions", {"temprature": 1}, 400, "temprature"),
    ("cmpl-prompt-bools", "/v1/completions", {"prompt": [True, False]}, 400, "prompt"),
    ("cmpl-prompt-vocab", "/v1/completions", {"prompt": [5, 99999]}, 400, "outside the vocab"),
    ("cmpl-n-times-prompts", "/v1/completions", {"prompt": ["a"] * 3, "n": 3}, 400, "9 samples"),
]


@pytest.mark.parametrize(
    ("path", "change", "status", "needle"),
    [c[1:] for c in OPENAI_CASES],
    ids=[c[0] for c in OPENAI_CASES],
)
def test_openai_refuses(http, model_dir, path, change, status, needle):
    base = {"model": str(model_dir), "max_tokens": 2}
    base |= {"messages": ASK} if "chat" in path else {"prompt": "1+1="}
    r = http.post(
        path, content=json.dumps(base | change), headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert needle in r.json()["error"]["message"]


def test_unknown_model_is_404(http):
    r = http.post("/v1/chat/completions", json={"model": "glm-9", "messages": ASK})
    assert r.status_code == 404 and "glm-9" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_body_over_the_limit_is_413(http, path):
    big = {"text": "x" * (MAX_BODY + 1), "model": "m", "prompt": "x" * (MAX_BODY + 1)}
    r = http.post(path, json=big)
    assert r.status_code == 413 and f"limit of {MAX_BODY} bytes" in r.text


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        yield b'{"text": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    r = http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "above this server's limit" in r.text


def test_health_answers_while_a_big_tokenization_runs(served):
    """Tokenization runs off the event loop: /health answers while a tokenizer call is stuck.
    No timing: the tokenizer blocks until the test releases it after /health answered; had
    tokenization held the loop, /health could not answer and the release wait would time out
    (recorded, and asserted)."""
    server, engine = served
    started, release = threading.Event(), threading.Event()
    outcome: dict[str, bool] = {}
    real_encode = engine.tokenizer.encode

    def blocking_encode(text, *a, **kw):
        if text.startswith("BLOCK"):
            started.set()
            outcome["released"] = release.wait(timeout=60)  # False = the loop was held
        return real_encode(text, *a, **kw)

    async def scenario() -> int:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"text": "BLOCK " + "1+1=" * 2000, "sampling_params": {"max_new_tokens": 1}}
            big = asyncio.create_task(client.post("/generate", json=body))
            await asyncio.to_thread(started.wait, 60)
            health = await client.get("/health")
            release.set()
            await big
            return health.status_code

    engine.tokenizer.encode = blocking_encode
    try:
        assert asyncio.run(scenario()) == 200
    finally:
        release.set()
        del engine.tokenizer.encode
    assert started.is_set() and outcome == {"released": True}


# ---- weight updates ------------------------------------------------------------------------


def _named(engine, change):
    """The served model's tensors with `change(name, tensor) -> (name, tensor)` applied to the
    first one (the embedding)."""
    named = [(n, t.detach().clone()) for n, t in engine.model.hf_state_dict()]
    named[0] = change(*named[0])
    return named


def _nan(n, t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return n, t


WEIGHT_CASES = [
    ("nan-value", _nan, "non-finite value"),
    ("inf-value", lambda n, t: (n, torch.full_like(t, math.inf)), "non-finite value"),
    ("int64-dtype", lambda n, t: (n, t.to(torch.int64)), "dtype int64 is not one of"),
    ("bool-dtype", lambda n, t: (n, t > 0), "dtype bool is not one of"),
    ("wrong-shape", lambda n, t: (n, t[:-1]), "expected shape"),
    ("unknown-name", lambda n, t: ("model.embed_tokenz.weight", t), "unknown tensor name"),
]


@pytest.mark.parametrize(
    ("change", "needle"), [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES]
)
def test_bad_weight_tensors_are_400_and_old_weights_kept(served, http, change, needle):
    engine = served[1]
    mp.set_sharing_strategy("file_system")
    before = greedy_ids(http)
    named = _named(engine, change)
    # everything else replaced by a different model: a partial load would change the output
    other = dict(tiny_model(seed=7, vocab_size=engine.model.config.vocab_size).hf_state_dict())
    named = named[:1] + [(n, other[n]) for n, _ in named[1:]]
    http.post("/begin_weight_update", json={})
    try:
        r = http.post(
            "/update_weights_from_tensor",
            json={"serialized_named_tensors": [serialize_named_tensors(named)]},
        )
    finally:
        http.post("/end_weight_update", json={})
    assert r.status_code == 400 and needle in r.json()["message"], r.text
    assert "previous weights are kept" in r.json()["message"]
    assert greedy_ids(http) == before


def test_bad_physarum_extension_update_is_400(served, http):
    engine = served[1]
    before = greedy_ids(http)
    named = _named(engine, _nan)
    update = build_weight_update(named, version=5, dtype=torch.float32)
    field = base64.b64encode(encode_weight_update(update)).decode()
    http.post("/begin_weight_update", json={})
    try:
        r = http.post("/update_weights_from_tensor", json={"physarum_weight_update": field})
    finally:
        http.post("/end_weight_update", json={})
    assert r.status_code == 400 and "non-finite" in r.json()["message"]
    assert greedy_ids(http) == before and http.get("/model_info").json()["weight_version"] != "5"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"serialized_named_tensors": ["not base64!"]}, "not valid base64"),
        ({"serialized_named_tensors": []}, "at least one payload"),
        ({"physarum_weight_update": "AAAA"}, "physarum_weight_update: cannot decode"),
        ({"serialized_named_tensors": ["eA=="], "load_format": "flattened"}, "load_format"),
    ],
    ids=["bad-base64", "no-payload", "bad-extension", "load-format"],
)
def test_undecodable_weight_payloads_are_400(http, body, needle):
    http.post("/begin_weight_update", json={})
    try:
        r = http.post("/update_weights_from_tensor", json=body)
    finally:
        http.post("/end_weight_update", json={})
    assert r.status_code == 400 and needle in r.json()["message"], r.text


def test_update_outside_a_session_is_400(http):
    r = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["eA=="]})
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]


def test_disk_update_with_a_nan_checkpoint_is_400(served, http, tmp_path):
    engine = served[1]
    before = greedy_ids(http)
    bad = tiny_model(seed=3, vocab_size=engine.model.config.vocab_size)
    with torch.no_grad():
        next(bad.parameters()).view(-1)[0] = float("nan")
    save_pretrained(bad, tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    r = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path)})
    assert r.status_code == 400 and "non-finite" in r.json()["message"], r.text
    assert str(tmp_path) in r.json()["message"]
    assert greedy_ids(http) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written there


def test_disk_update_without_config_is_400(http, tmp_path):
    r = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path)})
    assert r.status_code == 400 and "has no config.json" in r.json()["message"]
