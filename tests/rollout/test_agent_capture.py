"""Token-exact capture: an agent's OpenAI calls (official client, real server) become an
Episode whose trained tokens are exactly the engine's samples, with the engine's logprobs;
prefix mismatches split or drop, and are counted."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from models import from_pretrained
from models.chat import prompt_ids
from models.tokenizer import load_tokenizer
from rollout.agent_capture import CapturedCall, build_episodes
from rollout.server import ServerThread, load_engine, make_state
from tests.rollout.engine_helpers import model_logprobs
from tests.rollout.openai_helpers import ADD_TOOL, ASK, build_tool_model_dir

torch.set_num_threads(1)

CAPTURE = {"return_token_ids": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tool_model_dir(tmp_path_factory.mktemp("tiny_capture"))


@pytest.fixture(scope="module")
def client(model_dir):
    engine = load_engine(model_dir, max_running=8, context_len=512)
    with ServerThread(
        make_state(engine, str(model_dir), tokenizer_path=str(model_dir), no_auth=True)
    ) as srv:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0) as c:
            yield c
    engine.shutdown()


def _call(client, model_dir, messages, **kw) -> tuple[dict, CapturedCall]:
    r = client.chat.completions.create(
        model=str(model_dir), messages=messages, tools=[ADD_TOOL], logprobs=True,
        extra_body={**CAPTURE, **kw.pop("extra_body", {})}, **kw,
    )  # fmt: skip
    body = r.model_dump()
    return body, CapturedCall.from_chat_completion(body)


def test_episode_trains_exactly_the_engines_tokens_and_logprobs(client, model_dir):
    tok = load_tokenizer(model_dir)
    body1, call1 = _call(client, model_dir, ASK, temperature=0, max_tokens=64)
    message = body1["choices"][0]["message"]
    assert body1["choices"][0]["finish_reason"] == "tool_calls"
    history = [*ASK, {k: v for k, v in message.items() if v is not None}]
    history.append({"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "5"})
    _, call2 = _call(
        client, model_dir, history, temperature=0.8, seed=3, max_tokens=6,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    result = build_episodes([call1, call2], "split", {"task": "add"})
    assert result.prefix_mismatches == 0
    (ep,) = result.episodes
    # the prompt is the first call's; the context grew token for token
    assert ep.prompt_ids.tolist() == prompt_ids(tok, ASK, [ADD_TOOL]) == call1.prompt_ids
    full = ep.prompt_ids.tolist() + ep.response_ids.tolist()
    assert full[: len(call2.prompt_ids)] == call2.prompt_ids
    # trained tokens == the engine's samples, their logprobs and versions == the engine's
    trained = ep.response_ids[ep.loss_mask == 1].tolist()
    assert trained == call1.output_ids + call2.output_ids
    lps = ep.rollout_logprobs[ep.loss_mask == 1]
    np.testing.assert_array_equal(lps, np.float32(call1.logprobs + call2.logprobs))
    assert ep.versions[ep.loss_mask == 1].tolist() == [0] * len(trained)
    # the tool result and next generation prompt: mask 0, logprob 0, version -1
    inserted = ep.response_ids[ep.loss_mask == 0]
    assert tok.decode(inserted.tolist()).startswith("\n<tool_response>\n5\n</tool_response>")
    assert (ep.rollout_logprobs[ep.loss_mask == 0] == 0).all()
    assert (ep.versions[ep.loss_mask == 0] == -1).all()
    assert ep.metadata == {"task": "add", "calls": 2, "segment": 0, "segments": 1}
    # and the engine's logprobs are the model's own at those positions of the whole episode
    reference = from_pretrained(model_dir).eval()
    pos = np.flatnonzero(ep.loss_mask)
    n1 = len(call1.output_ids)
    ref1 = model_logprobs(reference, call1.prompt_ids, call1.output_ids, temperature=1.0)
    ref2 = model_logprobs(
        reference, full[: len(call2.prompt_ids)], call2.output_ids, temperature=0.8
    )
    torch.testing.assert_close(torch.tensor(lps[:n1]), ref1, atol=5e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(lps[n1:]), ref2, atol=5e-5, rtol=0)
    assert len(pos) == len(trained)


def test_rerendered_history_splits_or_drops_and_is_counted(client, model_dir):
    _, call1 = _call(client, model_dir, ASK, temperature=0, max_tokens=64)
    # the agent hands back an assistant turn that re-renders differently from what was sampled
    edited = [*ASK, {"role": "assistant", "content": "let me think"}]
    edited.append({"role": "user", "content": "go on"})
    _, call2 = _call(client, model_dir, edited, temperature=0, max_tokens=4)
    split = build_episodes([call1, call2], "split")
    assert split.prefix_mismatches == 1 and len(split.episodes) == 2
    first, second = split.episodes
    assert first.response_ids.tolist() == call1.output_ids and first.loss_mask.all()
    assert second.prompt_ids.tolist() == call2.prompt_ids
    assert second.response_ids.tolist() == call2.output_ids
    assert [e.metadata["segment"] for e in split.episodes] == [0, 1]
    dropped = build_episodes([call1, call2], "drop")
    assert dropped.episodes == [] and dropped.prefix_mismatches == 1


def test_capture_refuses_what_it_cannot_make_exact():
    with pytest.raises(ValueError, match="on_prefix_mismatch"):
        build_episodes([], "keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="return_token_ids"):
        CapturedCall.from_chat_completion({"choices": [{}]})
    with pytest.raises(ValueError, match="2 output_ids but 1 logprobs"):
        CapturedCall([1], [2, 3], [0.0], [0, 0])
    assert build_episodes([], "split").episodes == []
