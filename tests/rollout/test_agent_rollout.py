"""Agent episodes end to end: a user's agent, written with the official `openai` client, calls
the worker's own endpoint (`AgentServer`, real uvicorn socket) and the Episode trains exactly
the token ids the engine sampled, with the engine's logprobs and versions. Agents that raise,
time out or return garbage become error episodes, counted, and never raise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from buffer.episode import FinishReason
from envs.agent import resolve_agent
from models import from_pretrained
from models.tokenizer import load_tokenizer, stop_token_ids
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from rewards.resolver import PluginError
from rollout.agent_rollout import AgentRunner
from rollout.agent_server import AgentServer
from rollout.server import load_engine
from rollout.types import SamplingParams
from tests.rollout.engine_helpers import model_logprobs
from tests.rollout.openai_helpers import ADD_TOOL, ASK, build_tool_model_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tool_model_dir(tmp_path_factory.mktemp("tiny_agent"))


@pytest.fixture(scope="module")
def served(model_dir):
    """(engine, server, every Sequence the engine was handed, in order)."""
    engine = load_engine(model_dir, max_running=8, context_len=512)
    sampled = []
    submit = engine.submit

    def spy(seqs):  # what the engine really ran: the truth the Episode is checked against
        sampled.extend(seqs)
        submit(seqs)

    engine.submit = spy
    server = AgentServer(engine).start()
    yield engine, server, sampled
    server.stop()
    engine.shutdown()


def _runner(served, model_dir, agent, **kw) -> AgentRunner:
    options = dict(timeout_s=60.0, on_prefix_mismatch="split", max_concurrent=4) | kw
    return AgentRunner(agent, served[1], load_tokenizer(model_dir), **options)


def _sampling(model_dir, seed: int | None = 0) -> SamplingParams:
    stops = list(stop_token_ids(load_tokenizer(model_dir)))
    return SamplingParams(max_new_tokens=64, temperature=1.0, stop_token_ids=stops,
                          sampling_seed=seed)  # fmt: skip


async def tool_agent(client, task: dict) -> dict:
    """Ask, run the add tool the model calls, ask again: a two-call OpenAI agent."""
    messages = list(task["messages"])
    first = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[ADD_TOOL], temperature=0.0
    )
    message = first.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls or ():
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "5"})
    second = await client.chat.completions.create(model="m", messages=messages, tools=[ADD_TOOL])
    return {"called": float(bool(message.tool_calls)), "answered": float(bool(second.choices))}


def test_trained_tokens_are_the_engines_samples(served, model_dir):
    engine, _, sampled = served
    runner = _runner(served, model_dir, tool_agent)
    before = len(sampled)
    task = {"id": "t1", "task": "add", "messages": ASK}
    (episode,) = asyncio.run(runner.run(task, _sampling(model_dir, seed=1)))
    seqs = sampled[before:]
    assert len(seqs) == 2 and episode.finish_reason is FinishReason.STOP
    assert episode.metadata["prefix_mismatches"] == 0 and episode.metadata["calls"] == 2
    assert episode.metadata["num_tool_calls"] == 1  # the overfitted model called `add`
    assert episode.metadata["agent_rewards"] == {"called": 1.0, "answered": 1.0}
    mask = episode.loss_mask == 1
    # trained ids == exactly what the engine sampled, call after call; same logprobs, versions
    assert episode.response_ids[mask].tolist() == seqs[0].output_ids + seqs[1].output_ids
    np.testing.assert_array_equal(
        episode.rollout_logprobs[mask], np.float32(seqs[0].logprobs + seqs[1].logprobs)
    )
    assert episode.versions[mask].tolist() == seqs[0].versions + seqs[1].versions
    # the episode's prompt is the first call's; the second call's prompt is the context so far
    assert episode.prompt_ids.tolist() == seqs[0].prompt_ids
    context = episode.prompt_ids.tolist() + episode.response_ids.tolist()
    assert context[: len(seqs[1].prompt_ids)] == seqs[1].prompt_ids
    assert (episode.rollout_logprobs[~mask] == 0).all() and (episode.versions[~mask] == -1).all()
    # the job's sampling, not the agent's: temperature 1 although the agent asked for 0
    assert all(s.params.temperature == 1.0 for s in seqs)
    # the engine's logprobs are the policy's own at those positions of the whole episode
    reference = from_pretrained(model_dir).eval()
    with torch.no_grad():
        recomputed = model_logprobs(reference, episode.prompt_ids.tolist(),
                                    episode.response_ids.tolist())  # fmt: skip
    torch.testing.assert_close(
        recomputed[torch.from_numpy(mask)], torch.from_numpy(episode.rollout_logprobs[mask]),
        atol=2e-4, rtol=0,
    )  # fmt: skip
    assert runner.stats.snapshot()["agent/calls"] == 2


def test_the_rollout_worker_trains_what_its_engine_sampled(model_dir, tmp_path):
    """The same through RolloutWorkerCore, as a job builds it from env.agent: the agent
    resolved by import path, the worker's own endpoint, n runs of one row."""
    from configs import load_job
    from rollout.producer import sampling_from_config
    from rollout.worker import RolloutWorkerCore

    job = load_job(Path("configs/toy_openai_agent.yaml"), [
        f"run_dir={tmp_path}", f"model.path={model_dir}", f"tokenizer.path={model_dir}",
        "env.agent=tests.rollout.test_agent_rollout:tool_agent", "rollout.max_new_tokens=64",
        "rollout.max_context=512", "rollout.max_running=4",
    ])  # fmt: skip
    core = RolloutWorkerCore(job, model_dir=model_dir, tokenizer_dir=model_dir, worker_id="w")
    try:
        sampled, submit = [], core.engine.submit
        core.engine.submit = lambda seqs: (sampled.extend(seqs), submit(seqs))
        sampling = sampling_from_config(job.rollout, core.stop_ids, seed=1)
        row = {"id": "r", "task": "add", "messages": ASK}
        episodes = asyncio.run(core.generate_for_row(row, sampling, 2))
        assert core.stats()["agent/runs"] == 2 and core.stats()["agent/calls"] == len(sampled) == 4
    finally:
        core.shutdown()
    pool = list(sampled)
    for episode in episodes:  # every trained span is one call the engine ran, token for token
        mask = episode.loss_mask.tolist()
        context = episode.prompt_ids.tolist() + episode.response_ids.tolist()
        start, i = len(episode.prompt_ids), 0
        while i < len(mask):
            if not mask[i]:
                i += 1
                continue
            at = start + i
            same_tokens = [
                s
                for s in pool
                if s.prompt_ids == context[:at]
                and s.output_ids == context[at : at + len(s.output_ids)]
            ]
            # the n runs can make identical calls; their logprobs may differ in the last bit
            # (a batch of one token sums in another order), so the span's own call is the one
            # whose logprobs it carries exactly
            logprobs = episode.rollout_logprobs[i:]
            (seq,) = [
                s
                for s in same_tokens
                if np.array_equal(logprobs[: len(s.output_ids)], np.float32(s.logprobs))
            ][:1]
            n = len(seq.output_ids)
            assert mask[i : i + n] == [1] * n
            assert episode.versions[i : i + n].tolist() == seq.versions
            pool.remove(seq)
            i += n
    assert pool == []  # and every call the engine ran is trained


def test_a_rerendered_history_splits_or_drops(served, model_dir):
    """Seed 0 makes the model write a malformed call: the endpoint returns it as text, the
    agent sends it back, the template renders it without the <|observation|> the model
    sampled: a real prefix mismatch. split trains on both parts as sampled; drop on none."""
    _, _, sampled = served
    task = {"id": "t2", "task": "add", "messages": ASK}
    split = _runner(served, model_dir, tool_agent)
    before = len(sampled)
    episodes = asyncio.run(split.run(task, _sampling(model_dir, seed=0)))
    seqs = sampled[before:]
    assert len(episodes) == 2 and split.stats.snapshot()["agent/prefix_mismatches"] == 1
    for episode, seq in zip(episodes, seqs, strict=True):
        assert episode.prompt_ids.tolist() == seq.prompt_ids
        assert episode.response_ids.tolist() == seq.output_ids  # all sampled, nothing else
        assert episode.loss_mask.all() and episode.rollout_logprobs.tolist() == pytest.approx(
            np.float32(seq.logprobs).tolist(), abs=0
        )
    drop = _runner(served, model_dir, tool_agent, on_prefix_mismatch="drop")
    (dropped,) = asyncio.run(drop.run(task, _sampling(model_dir, seed=0)))
    assert dropped.num_trainable == 0 and dropped.metadata["dropped"] == "prefix_mismatch"
    assert dropped.finish_reason is FinishReason.STOP  # still scored: its group keeps n rewards
    assert drop.stats.snapshot()["agent/dropped_runs"] == 1


async def raising_agent(client, task: dict) -> float:
    await client.chat.completions.create(model="m", messages=task["messages"], max_tokens=4)
    raise KeyError("no such field")


async def sleeping_agent(client, task: dict) -> float:
    await asyncio.sleep(3600)
    return 1.0


async def wrong_result_agent(client, task: dict) -> str:
    return "yes"


def test_failing_agents_become_error_episodes(served, model_dir):
    async def run_all():
        out = {}
        for agent, timeout in ((raising_agent, 60.0), (sleeping_agent, 0.2),
                               (wrong_result_agent, 60.0), (tool_agent, 60.0)):  # fmt: skip
            runner = _runner(served, model_dir, agent, timeout_s=timeout)
            task = {"id": agent.__name__, "task": "add", "messages": ASK}
            # seed 1: the tool agent's run is the one of the test above (a call, no split)
            out[agent.__name__] = (await runner.run(task, _sampling(model_dir, 1)), runner)
        return out

    results = asyncio.run(run_all())
    (raised,), runner = results["raising_agent"]
    assert raised.finish_reason is FinishReason.ERROR
    assert (
        "raised KeyError" in raised.metadata["error"]
        and "no such field" in raised.metadata["error"]
    )
    assert raised.num_trainable >= 1  # its call was captured all the same
    assert runner.stats.snapshot()["agent/error/KeyError"] == 1
    (slept,), runner = results["sleeping_agent"]
    assert slept.finish_reason is FinishReason.ERROR and "timed out" in slept.metadata["error"]
    assert slept.num_trainable == 0 and len(slept.prompt_ids) > 0  # the task's prompt, no call
    assert runner.stats.timeouts == 1 and runner.stats.snapshot()["agent/error/TimeoutError"] == 1
    (wrong,), _ = results["wrong_result_agent"]
    assert (
        wrong.finish_reason is FinishReason.ERROR and "expected a float" in wrong.metadata["error"]
    )
    # reward plugins score the finished episodes: the agent's rewards pass through, errors get 0
    episodes = [raised, slept, wrong, *results["tool_agent"][0]]
    reward_fn = build_reward_fn([RewardSpec("agent")], timeout_s=10)
    asyncio.run(reward_fn.score_group(episodes))
    reward_fn.close()
    assert [e.reward for e in episodes] == [0.0, 0.0, 0.0, 2.0]
    assert episodes[-1].rewards == {"agent": 2.0, "agent/called": 1.0, "agent/answered": 1.0}


def test_endpoint_refuses_what_it_cannot_capture(served, model_dir):
    import openai

    server = served[1]
    with server.episode(_sampling(model_dir)) as recorder:
        with openai.OpenAI(base_url=server.base_url, api_key=recorder.key, max_retries=0) as c:
            with pytest.raises(openai.BadRequestError, match="stream"):
                c.chat.completions.create(model="m", messages=ASK, stream=True)
            with pytest.raises(openai.BadRequestError) as refused:
                c.chat.completions.create(model="m", messages=ASK, n=2)
            assert refused.value.body["param"] == "n"
            assert [m.id for m in c.models.list()] == ["policy"]
        # only the OpenAI routes are served: no /generate, no weight updates
        answer = httpx.post(server.base_url[: -len("/v1")] + "/generate", json={"text": "x"},
                            headers={"Authorization": f"Bearer {recorder.key}"})  # fmt: skip
        assert answer.status_code == 404
        assert server.calls(recorder) == []
    with openai.OpenAI(base_url=server.base_url, api_key=recorder.key, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):  # the episode is over
            c.chat.completions.create(model="m", messages=ASK)


def test_an_answer_near_the_context_end_is_cut_not_refused(served, model_dir):
    import openai

    from models.chat import prompt_ids

    tok = load_tokenizer(model_dir)
    n = next(n for n in range(1, 400) if len(prompt_ids(tok, _long(n), None)) > 500)
    room = 512 - len(prompt_ids(tok, _long(n), None))  # the fixture's context_len is 512
    server = served[1]
    with server.episode(_sampling(model_dir)) as recorder:  # max_new_tokens 64 > room
        with openai.OpenAI(base_url=server.base_url, api_key=recorder.key, max_retries=0) as c:
            answer = c.chat.completions.create(
                model="m", messages=_long(n), extra_body={"ignore_eos": True}
            )
        assert answer.choices[0].finish_reason == "length"
        (call,) = server.calls(recorder)
        assert len(call.call.output_ids) == room


def _long(n: int) -> list[dict]:
    return [{"role": "user", "content": "2+3? " * n}]


def test_agent_plugins_resolve_like_rewards():
    from envs.examples.openai_calculator_agent import solve

    assert resolve_agent("openai_calculator") is solve
    assert resolve_agent("envs.examples.openai_calculator_agent:solve") is solve
    with pytest.raises(PluginError, match="async def run"):
        resolve_agent("envs.examples.openai_calculator_agent:calculate")
    with pytest.raises(PluginError, match="two positional"):
        resolve_agent("tests.rollout.test_agent_rollout:_one_argument_agent")
    with pytest.raises(PluginError, match="Valid built-in names: openai_calculator"):
        resolve_agent("no_such_agent")


async def _one_argument_agent(client) -> float:
    return 0.0
