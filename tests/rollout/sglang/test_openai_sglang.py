"""The official `openai` client against a real SGLang 0.5.23 server launched as
`rollout.engine: sglang` launches it from a job (with the job's API key), directly and through
sglang-router in front of it (started with the same key, which it then requires of clients):
/v1/models, chat completions plain, streamed, with logprobs and with tools, /v1/completions.
The served checkpoint is the tiny model overfitted to answer ASK with a GLM-4.x tool call
(tests/rollout/openai_helpers.py), so the launcher's --tool-call-parser is checked on a real
call."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from configs.loader import load_job
from models.tokenizer import load_tokenizer
from rollout.sglang.engine import launch_sglang_engine
from rollout.sglang.router import SGLangRouter
from rollout.sglang.server import free_port
from tests.rollout.openai_helpers import ADD_TOOL, ASK, build_tool_model_dir

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(400)]
CONFIGS = Path(__file__).resolve().parents[3] / "configs"
KEY = "sglang-openai-test-key"


@pytest.fixture(scope="module")
def model_dir(sglang_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_tool_model_dir(tmp_path_factory.mktemp("tiny_tool_sglang"))


@pytest.fixture(scope="module")
def server(sglang_env, model_dir: Path, run_dir: Path):
    job = load_job(
        CONFIGS / "toy_grpo.yaml",
        [
            "rollout.engine=sglang",
            f"run_dir={run_dir}",
            "rollout.max_context=512",
            "rollout.sglang.dtype=float32",
            "rollout.sglang.base_port=0",
            f"rollout.sglang.api_key={KEY}",
            f"rollout.sglang.python={sglang_env.python}",
        ],
    )
    engine = launch_sglang_engine(job, model_dir, name="rollout-0")
    (worker,) = engine.workers
    assert "--tool-call-parser" in worker.server.args.extra_args
    yield worker.server
    engine.shutdown()


def _observation(model_dir: Path) -> dict:
    """The toy checkpoint's config names only <|endoftext|> as EOS (a GLM-4.5 checkpoint's
    generation_config also lists <|observation|>), so the call's end is asked for explicitly."""
    return {"stop_token_ids": [load_tokenizer(model_dir).convert_tokens_to_ids("<|observation|>")]}


def _check(base_url: str, model_dir: Path) -> None:
    with openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == [str(model_dir)]
        kw = dict(model=str(model_dir), messages=ASK, max_tokens=6, temperature=0)
        kw["extra_body"] = {"ignore_eos": True}
        r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
        choice = r.choices[0]
        assert r.usage.completion_tokens == 6 and choice.finish_reason == "length"
        entries = choice.logprobs.content
        assert len(entries) == 6
        for e in entries:  # greedy: the sampled token is the most likely one
            first, second = e.top_logprobs
            assert first.logprob >= second.logprob
            assert e.logprob == pytest.approx(first.logprob, abs=1e-5)
        streamed = "".join(
            ch.delta.content or ""
            for chunk in client.chat.completions.create(**kw, stream=True)
            for ch in chunk.choices
        )
        assert streamed == choice.message.content
        done = client.completions.create(
            model=str(model_dir), prompt="2+3=", max_tokens=4, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert done.usage.completion_tokens == 4 and done.choices[0].finish_reason == "length"
        tool = client.chat.completions.create(
            model=str(model_dir), messages=ASK, tools=[ADD_TOOL], temperature=0, max_tokens=64,
            extra_body=_observation(model_dir),
        )  # fmt: skip
        (call,) = tool.choices[0].message.tool_calls
        assert call.function.name == "add" and json.loads(call.function.arguments) == {
            "a": 2,
            "b": 3,
        }
        assert tool.choices[0].finish_reason == "tool_calls"
    with openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.APIStatusError) as err:
            bad.models.list()
        assert err.value.status_code == 401


def test_openai_client_against_the_sglang_server(server, model_dir: Path):
    _check(server.url, model_dir)


def test_openai_client_through_the_router(server, model_dir: Path, run_dir: Path):
    router = SGLangRouter(port=free_port(), log_path=run_dir / "router-openai.log", api_key=KEY)
    router.start()
    try:
        router.add_worker(server.url, api_key=KEY)  # our own /workers calls carry the key
        with openai.OpenAI(base_url=router.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.APIStatusError) as err:  # not an open door to the key
                bad.chat.completions.create(model=str(model_dir), messages=ASK, max_tokens=2)
            assert err.value.status_code == 401
        with openai.OpenAI(base_url=router.url + "/v1", api_key=KEY, max_retries=0) as client:
            kw = dict(model=str(model_dir), messages=ASK, max_tokens=6, temperature=0)
            kw["extra_body"] = {"ignore_eos": True}
            r = client.chat.completions.create(**kw)
            assert r.usage.completion_tokens == 6
            streamed = "".join(
                ch.delta.content or ""
                for chunk in client.chat.completions.create(**kw, stream=True)
                for ch in chunk.choices
            )
            assert streamed == r.choices[0].message.content
            tool = client.chat.completions.create(
                model=str(model_dir), messages=ASK, tools=[ADD_TOOL], temperature=0,
                max_tokens=64, extra_body=_observation(model_dir),
            )  # fmt: skip
            assert tool.choices[0].message.tool_calls[0].function.name == "add"
            assert tool.choices[0].finish_reason == "tool_calls"
    finally:
        router.stop()
