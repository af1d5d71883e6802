"""The engine server's OpenAI-compatible routes, driven by the official `openai` client
(sync and async, streamed and not, with and without tools) against a real uvicorn socket.

The served tiny model is first overfitted on one tool-calling conversation so that, greedy,
it really emits GLM-4.x tool-call text; everything else it generates is noise, which the
tests compare token for token against the tokenizer and the model's own logprobs."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from models import from_pretrained
from models.chat import prompt_ids
from models.tokenizer import load_tokenizer
from rollout.server import ServerThread, load_engine, make_state
from tests.rollout.engine_helpers import model_logprobs
from tests.rollout.openai_helpers import ADD_TOOL, ASK, build_tool_model_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tool_model_dir(tmp_path_factory.mktemp("tiny_openai"))


@pytest.fixture(scope="module")
def served(model_dir):
    engine = load_engine(model_dir, max_running=16, context_len=512)
    server = ServerThread(
        make_state(engine, str(model_dir), tokenizer_path=str(model_dir), no_auth=True)
    )
    with server:
        yield server, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return from_pretrained(model_dir).eval()


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def _async_client(served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0)


def test_models_list_and_retrieve(client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [str(model_dir)]
    assert client.models.retrieve(str(model_dir)).id == str(model_dir)
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"


def test_chat_plain_tokens_and_logprobs_are_the_engines(client, model_dir, tok, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(
        model=str(model_dir),
        messages=messages,
        max_tokens=12,
        temperature=0.7,
        seed=11,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = r.choices[0]
    extra = r.model_extra
    prompt = prompt_ids(tok, messages)
    assert extra["prompt_token_ids"] == prompt
    ids = choice.model_extra["token_ids"]
    assert len(ids) == 12 and choice.finish_reason == "length"
    assert choice.model_extra["weight_versions"] == [0] * 12
    assert choice.message.content == tok.decode(ids, skip_special_tokens=True)
    assert choice.message.tool_calls is None
    lps = [e.logprob for e in choice.logprobs.content]
    ref = model_logprobs(reference, prompt, ids, temperature=0.7)
    torch.testing.assert_close(torch.tensor(lps), ref, atol=5e-5, rtol=0)
    assert [e.token for e in choice.logprobs.content] == [tok.decode([t]) for t in ids]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 12
    again = client.chat.completions.create(
        model=str(model_dir), messages=messages, max_tokens=12, temperature=0.7, seed=11,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert again.choices[0].model_extra["token_ids"] == ids  # the seed is honoured


def test_chat_tool_call_then_tool_result_round_trip(client, model_dir, tok):
    r = client.chat.completions.create(
        model=str(model_dir), messages=ASK, tools=[ADD_TOOL], temperature=0, max_tokens=64
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}
    assert choice.message.content == "ok"
    # the assistant turn (as the client hands it back) and the tool result, re-rendered
    history = [*ASK, choice.message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": "5"})
    follow = client.chat.completions.create(
        model=str(model_dir), messages=history, tools=[ADD_TOOL], max_tokens=3,
        temperature=0, extra_body={"return_token_ids": True},
    )  # fmt: skip
    expected = prompt_ids(tok, history, [ADD_TOOL])
    assert follow.model_extra["prompt_token_ids"] == expected
    text = tok.decode(expected, skip_special_tokens=False)
    assert "<tool_call>add" in text and "<tool_response>\n5\n</tool_response>" in text
    # tool_choice "none": the same generation stays text
    plain = client.chat.completions.create(
        model=str(model_dir), messages=ASK, tools=[ADD_TOOL], tool_choice="none",
        temperature=0, max_tokens=64,
    )  # fmt: skip
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
    assert "<tool_call>add" in plain.choices[0].message.content


def test_async_chat_tools_streamed_and_not(served, model_dir):
    async def run():
        async with _async_client(served) as c:
            kw = dict(model=str(model_dir), messages=ASK, tools=[ADD_TOOL], temperature=0)
            whole = await c.chat.completions.create(**kw, max_tokens=64)
            stream = await c.chat.completions.create(
                **kw, max_tokens=64, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            return whole, chunks

    whole, chunks = asyncio.run(run())
    content, calls, reasons = "", {}, []
    for chunk in chunks[:-1]:
        (ch,) = chunk.choices
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or ():
            calls[d.index] = (d.function.name, d.function.arguments)
        reasons.append(ch.finish_reason)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "<tool_call>" not in content and content.strip() == "ok"
    expected = whole.choices[0].message.tool_calls[0].function
    assert calls == {0: (expected.name, expected.arguments)}
    assert [r for r in reasons if r] == ["tool_calls"] and reasons[-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_text_equals_whole_text_with_n_and_stop(client, model_dir, tok):
    kw = dict(
        model=str(model_dir), messages=[{"role": "user", "content": "1+2="}],
        max_completion_tokens=20, temperature=1.0, seed=5, n=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = {c.index: "" for c in whole.choices}
    reasons = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    # a stop string found in the first sample's text ends it there, streamed or not
    first = whole.choices[0].message.content
    stop = next(first[i : i + 2] for i in range(4, len(first) - 2) if first[i : i + 2].strip())
    kw.update(n=1, stop=[stop])
    cut = client.chat.completions.create(**kw)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == first[: first.find(stop)]
    streamed = "".join(
        ch.delta.content or "" for chunk in client.chat.completions.create(**kw, stream=True)
        for ch in chunk.choices
    )  # fmt: skip
    assert streamed == cut.choices[0].message.content


def test_completions_sync_async_streamed(client, served, model_dir, tok, reference):
    kw = dict(model=str(model_dir), prompt="1+2=", max_tokens=6, temperature=0, logprobs=0)
    kw["extra_body"] = {"ignore_eos": True, "return_token_ids": True}
    r = client.completions.create(**kw)
    (choice,) = r.choices
    ids = choice.model_extra["token_ids"]
    assert choice.model_extra["prompt_token_ids"] == tok.encode("1+2=")
    assert choice.text == tok.decode(ids, skip_special_tokens=True)
    assert choice.logprobs.tokens == [tok.decode([t]) for t in ids]
    ref = model_logprobs(reference, tok.encode("1+2="), ids)
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), ref, atol=5e-5, rtol=0)

    async def run():
        async with _async_client(served) as c:
            batch = await c.completions.create(**{**kw, "prompt": [[5, 9, 2], [3, 8]], "n": 2})
            stream = await c.completions.create(**kw, stream=True)
            return batch, [chunk async for chunk in stream]

    batch, chunks = asyncio.run(run())
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.model_extra["prompt_token_ids"] for c in batch.choices] == [[5, 9, 2]] * 2 + [
        [3, 8]
    ] * 2
    assert batch.usage.prompt_tokens == 5 and batch.usage.completion_tokens == 24
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "change, param",
    [
        ({"top_p": 3}, "top_p"),
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"tool_choice": "required", "tools": [ADD_TOOL]}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs=true
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "add", "arguments": "{not json"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),  # fmt: skip
    ],
)
def test_bad_parameters_are_400_naming_the_param(client, model_dir, change, param):
    kw = {"model": str(model_dir), "messages": ASK, "max_tokens": 2, **change}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw)
    body = err.value.body
    assert err.value.status_code == 400 and body["type"] == "invalid_request_error"
    assert body["param"] == param and param.split("[")[0] in body["message"]


def test_completion_errors_and_unknown_model(client, model_dir):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(model_dir), prompt=[5, 99999], max_tokens=2)
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(model_dir), prompt="x", echo=True)
    assert err.value.body["param"] == "echo"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="glm-9", messages=ASK)
    assert err.value.status_code == 404 and err.value.body["param"] == "model"


def test_api_key_guards_v1_and_generate(served, model_dir):
    engine = served[1]
    with ServerThread(make_state(engine, str(model_dir), api_key="s3cret")) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key" and "message" in err.value.body
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == str(model_dir)
        r = good.chat.completions.create(model=str(model_dir), messages=ASK, max_tokens=2)
        assert r.usage.completion_tokens <= 2
        assert httpx.post(srv.url + "/generate", json={"input_ids": [1]}).status_code == 401


def test_openapi_document_describes_every_route(served):
    doc = httpx.get(served[0].url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, request, response in [
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion"),
        ("/v1/completions", "CompletionRequest", "Completion"),
        ("/generate", "GenerateReqInput", "GenerateResponse"),
    ]:
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith("/" + request), path
        ok = json.dumps(op["responses"]["200"])
        assert f"/{response}" in ok, path
        assert request in schemas and response in schemas
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "input_ids" in schemas["GenerateReqInput"]["properties"]
    models = doc["paths"]["/v1/models"]["get"]["responses"]["200"]
    assert "/ModelList" in json.dumps(models)


def _reference_logsoftmax(reference, prompt: list[int], ids: list[int]) -> torch.Tensor:
    """float32 [len(ids), V]: the model's own log_softmax (temperature 1) at each output."""
    full = torch.tensor(prompt + ids)
    with torch.no_grad():
        hidden = reference.forward_packed(full, torch.tensor([0, len(full)])).hidden
        logits = hidden[len(prompt) - 1 : -1].float() @ reference.lm_head.weight.float().T
    return torch.log_softmax(logits, dim=-1)


def _check_tops(entries, ids, ref, k):
    for i, (t, e) in enumerate(zip(ids, entries)):
        values = [a.logprob for a in e.top_logprobs]
        assert len(values) == k and values == sorted(values, reverse=True)
        assert values[0] >= e.logprob
        assert abs(e.logprob - ref[i, t].item()) <= 1e-5
        torch.testing.assert_close(torch.tensor(values), ref[i].topk(k).values, atol=1e-5, rtol=0)
        assert all(a.bytes == list(a.token.encode()) for a in e.top_logprobs)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_chat_top_logprobs_sync_and_streamed(client, model_dir, tok, reference, temperature):
    messages = [{"role": "user", "content": "hello"}]
    kw = dict(
        model=str(model_dir), messages=messages, max_tokens=8, temperature=temperature, seed=5,
        logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    r = client.chat.completions.create(**kw)
    ids = r.choices[0].model_extra["token_ids"]
    entries = r.choices[0].logprobs.content
    ref = _reference_logsoftmax(reference, prompt_ids(tok, messages), ids)
    _check_tops(entries, ids, ref, 5)
    if temperature == 0:  # greedy: the sampled token is the top-1, with the same logprob
        assert all(e.top_logprobs[0].token == e.token for e in entries)
        assert all(e.top_logprobs[0].logprob == e.logprob for e in entries)
    streamed = [
        e for chunk in client.chat.completions.create(**kw, stream=True)
        for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content
    ]  # fmt: skip
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]


def test_completions_top_logprobs_sync_and_streamed(client, model_dir, tok, reference):
    kw = dict(model=str(model_dir), prompt="1+2=", max_tokens=6, temperature=0, logprobs=3)
    kw["extra_body"] = {"ignore_eos": True, "return_token_ids": True}
    r = client.completions.create(**kw)
    (choice,) = r.choices
    ids = choice.model_extra["token_ids"]
    ref = _reference_logsoftmax(reference, tok.encode("1+2="), ids)
    tops = choice.logprobs.top_logprobs
    assert len(tops) == len(ids) == 6
    for i, (t, lp, top) in enumerate(zip(ids, choice.logprobs.token_logprobs, tops)):
        assert 1 <= len(top) <= 3  # ids that decode to the same text share one key
        assert max(top.values()) == lp and top[tok.decode([t])] == lp  # greedy: top-1
        assert abs(lp - ref[i, t].item()) <= 1e-5
    streamed = [
        d for chunk in client.completions.create(**kw, stream=True)
        for ch in chunk.choices if ch.logprobs for d in ch.logprobs.top_logprobs
    ]  # fmt: skip
    assert streamed == tops


def test_engine_computes_top_logprobs_only_for_requests_that_ask(served):
    from rollout.types import GenerateRequest, SamplingParams

    engine = served[1]
    params = SamplingParams(max_new_tokens=3, temperature=1.0, sampling_seed=3)
    outs = asyncio.run(
        engine.generate(
            [
                GenerateRequest([5, 9, 2], params, top_logprobs_num=4),
                GenerateRequest([5, 9, 2], params),
            ]
        )
    )
    asked, plain = outs
    assert plain.top_logprobs is None
    assert asked.output_ids == plain.output_ids and asked.logprobs == plain.logprobs
    assert [len(t) for t in asked.top_logprobs] == [4, 4, 4]
    for tok_id, lp, top in zip(asked.output_ids, asked.logprobs, asked.top_logprobs):
        assert top[0][1] >= lp and (tok_id, lp) in top or lp < top[-1][1]
