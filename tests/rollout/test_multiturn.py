"""The multi-turn loop driven by a scripted policy: exact prompt/response/mask/logprob/version
arrays, observations from the real calculator env, the real toy tokenizer and chat template.

`ScriptedEngine` stands in for the engine (not the thing under test): it replays given token
sequences with given logprobs and versions and records every request it receives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from buffer.episode import FinishReason
from envs.base import StepResult
from envs.calculator import CalculatorEnv
from envs.tasks import TASKS, make_rows, tokenizer_corpus
from models import chat
from models.tokenizer import build_toy_tokenizer
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from rollout.evaluate import evaluate_rows
from rollout.multiturn import run_episode
from rollout.types import GenerateOutput, GenerateRequest, SamplingParams

torch.set_num_threads(1)


@dataclass
class Turn:
    """One scripted model turn: token ids, their logprobs and versions, how it ended."""

    ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str = "stop"


class ScriptedEngine:
    """Replays `turns` in order; `requests` records what it was asked."""

    def __init__(self, turns: list[Turn]) -> None:
        self.turns = list(turns)
        self.requests: list[GenerateRequest] = []

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        outputs = []
        for request in requests:
            self.requests.append(request)
            turn = self.turns.pop(0)
            stop = turn.ids[-1] if turn.finish_reason == "stop" else None
            outputs.append(
                GenerateOutput(
                    rid=request.rid or "r",
                    prompt_ids=list(request.input_ids),
                    output_ids=list(turn.ids),
                    logprobs=list(turn.logprobs),
                    versions=list(turn.versions),
                    finish_reason=turn.finish_reason,
                    matched_stop=stop,
                )
            )
        return outputs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out: Path = tmp_path_factory.mktemp("toy_tokenizer")
    return build_toy_tokenizer(out, tokenizer_corpus(n_per_task=200, seed=0))


@pytest.fixture(scope="module")
def row() -> dict:
    return make_rows("calculator", 1, seed=0)[0]


def model_turn(tokenizer, text: str, stop: str | None, version: int, seed: int) -> Turn:
    """Tokens a policy would produce for `text` (+ its stop token), with distinct logprobs."""
    ids = chat.encode(tokenizer, text)
    if stop is not None:
        ids.append(tokenizer.convert_tokens_to_ids(stop))
    rng = np.random.default_rng(seed)
    logprobs = (-rng.random(len(ids))).astype(np.float32).tolist()
    return Turn(ids, logprobs, [version] * len(ids))


def tool_call_text(expression: str) -> str:
    return (
        "\n<tool_call>calculator\n<arg_key>expression</arg_key>\n"
        f"<arg_value>{expression}</arg_value>\n</tool_call>"
    )


def run(engine, tokenizer, env, row, **kwargs):
    options = {"max_turns": 4, "max_total_tokens": 2048, **kwargs}
    sampling = SamplingParams(max_new_tokens=64, temperature=1.0)
    return asyncio.run(run_episode(engine, tokenizer, env, row, sampling, **options))


def test_tool_call_then_answer_matches_the_sft_rendering(tokenizer, row) -> None:
    expression, answer = row["metadata"]["expression"], row["label"]
    call = model_turn(tokenizer, tool_call_text(expression), "<|observation|>", version=3, seed=0)
    final = model_turn(tokenizer, f"\n{answer}", "<|endoftext|>", version=4, seed=1)
    engine = ScriptedEngine([call, final])
    episode = run(engine, tokenizer, CalculatorEnv(), row)

    observation = chat.observation_ids(tokenizer, [answer])
    assert episode.prompt_ids.tolist() == chat.prompt_ids(tokenizer, row["messages"], row["tools"])
    assert episode.response_ids.tolist() == call.ids + observation + final.ids
    assert episode.loss_mask.tolist() == [1] * len(call.ids) + [0] * len(observation) + [1] * len(
        final.ids
    )
    expected_logprobs = call.logprobs + [0.0] * len(observation) + final.logprobs
    np.testing.assert_array_equal(episode.rollout_logprobs, np.float32(expected_logprobs))
    assert episode.versions.tolist() == [3] * len(call.ids) + [-1] * len(observation) + [4] * len(
        final.ids
    )
    assert episode.finish_reason is FinishReason.STOP and episode.oldest_version == 3

    # The same conversation rendered by the chat template for SFT: identical ids and mask.
    demo = TASKS["calculator"].demonstration(row)
    sft_prompt, sft_response, sft_mask = chat.render_sft(tokenizer, demo, row["tools"])
    assert episode.prompt_ids.tolist() == sft_prompt
    assert episode.response_ids.tolist() == sft_response
    assert episode.loss_mask.tolist() == sft_mask

    # The second request continued the exact context: prompt + model tokens + observation.
    assert engine.requests[1].input_ids == sft_prompt + call.ids + observation
    stops = set(engine.requests[0].sampling.stop_token_ids)
    assert {tokenizer.convert_tokens_to_ids(t) for t in ("<|observation|>", "<|user|>")} <= stops

    meta = episode.metadata
    assert meta["turns"] == 2 and meta["num_tool_calls"] == 1
    assert meta["tool_calls"] == [
        {"turn": 0, "name": "calculator", "arguments": {"expression": expression}}
    ]
    assert meta["tool_errors"] == [] and meta["env_reward"] == 1.0
    assert meta["final_text"] == f"\n{answer}" and meta["label"] == answer
    assert meta["response_text"].endswith(f"</tool_response><|assistant|>\n{answer}")
    assert "truncated" not in meta and meta["timings"]["total_s"] >= 0


def test_rewards_score_the_multiturn_episode(tokenizer, row) -> None:
    answer = row["label"]
    engine = ScriptedEngine(
        [
            model_turn(tokenizer, tool_call_text("1+1"), "<|observation|>", 0, 0),
            model_turn(tokenizer, f"\n{answer}", "<|endoftext|>", 0, 1),
        ]
    )
    episode = run(engine, tokenizer, CalculatorEnv(), row)
    specs = [RewardSpec("calculator_task"), RewardSpec("env", weight=0.5)]
    with build_reward_fn(specs, timeout_s=5) as reward_fn:
        asyncio.run(reward_fn.score(episode))
    assert episode.rewards == {"calculator_task": 1.0, "env": 1.0}
    assert episode.reward == 1.5


def test_malformed_call_becomes_an_error_observation(tokenizer, row) -> None:
    broken = "\n<tool_call>calculator\n<arg_key>expression</arg_key>\n</tool_call>"
    engine = ScriptedEngine(
        [
            model_turn(tokenizer, broken, "<|observation|>", 0, 0),
            model_turn(tokenizer, tool_call_text("2**"), "<|observation|>", 0, 1),
            model_turn(tokenizer, "\n7", "<|endoftext|>", 0, 2),
        ]
    )
    episode = run(engine, tokenizer, CalculatorEnv(), row)
    contexts = [tokenizer.decode(r.input_ids) for r in engine.requests]
    assert "<tool_response>\nerror: tool call 1:" in contexts[1]
    assert "<tool_response>\nerror: calculator: invalid syntax" in contexts[2]
    assert len(episode.metadata["tool_errors"]) == 1
    assert episode.metadata["tool_errors"][0]["turn"] == 0
    assert episode.metadata["env_reward"] == 0.0  # 7 is not the label
    assert episode.finish_reason is FinishReason.STOP


def test_invalid_calculator_input_reaches_the_model_in_rollout_and_eval(tokenizer, row) -> None:
    """`1410*090` is no valid literal: the calculator's error is the observation the model
    reads next, and it fits the toy agentic budget (prompt + call + error < 256 tokens, the
    preset's max_total_tokens), in a training rollout and in a held-out eval alike."""
    call = tool_call_text("1410*090")

    def script(seed: int) -> ScriptedEngine:
        return ScriptedEngine(
            [
                model_turn(tokenizer, call, "<|observation|>", 0, seed),
                model_turn(tokenizer, "\n7", "<|endoftext|>", 0, seed + 1),
            ]
        )

    error = "<tool_response>\nerror: calculator: invalid syntax: leading zeros"
    engine = script(0)
    episode = run(engine, tokenizer, CalculatorEnv(), row, max_total_tokens=256)
    assert error in tokenizer.decode(engine.requests[1].input_ids)
    assert error in episode.metadata["response_text"]
    assert episode.finish_reason is FinishReason.STOP and episode.metadata["turns"] == 2

    async def generate(task_row: dict) -> list:
        return [await _episode_of(script(10), task_row)]

    async def _episode_of(engine: ScriptedEngine, task_row: dict):
        sampling = SamplingParams(max_new_tokens=64, temperature=0.0)
        return await run_episode(
            engine, tokenizer, CalculatorEnv(), task_row, sampling, max_turns=3,
            max_total_tokens=256,
        )  # fmt: skip

    async def score(episodes: list) -> None:
        for e in episodes:
            e.reward = e.metadata.get("env_reward", 0.0)

    outcome = asyncio.run(evaluate_rows([row], generate, score, k=1, concurrency=1))
    (sample,) = outcome.samples
    assert error in sample["response"]
    assert sample["tool_call_turns"] == [0] and sample["turns"] == 2
    assert sample["finish_reason"] == "stop" and sample["truncated"] is None


def test_max_turns_ends_without_a_trailing_observation(tokenizer, row) -> None:
    turns = [
        model_turn(tokenizer, tool_call_text("1+1"), "<|observation|>", 0, i) for i in range(3)
    ]
    engine = ScriptedEngine(turns)
    episode = run(engine, tokenizer, CalculatorEnv(), row, max_turns=3)
    assert episode.finish_reason is FinishReason.LENGTH
    assert episode.metadata["truncated"] == "max_turns" and episode.metadata["turns"] == 3
    observation = chat.observation_ids(tokenizer, ["2"])
    expected = turns[0].ids + observation + turns[1].ids + observation + turns[2].ids
    assert episode.response_ids.tolist() == expected
    assert episode.loss_mask[-len(turns[2].ids) :].all()
    assert "env_reward" not in episode.metadata


def test_token_budget_caps_generation_and_drops_an_observation_that_does_not_fit(
    tokenizer, row
) -> None:
    prompt_len = len(chat.prompt_ids(tokenizer, row["messages"], row["tools"]))
    call = model_turn(tokenizer, tool_call_text("1+1"), "<|observation|>", 0, 0)
    engine = ScriptedEngine([call])
    budget = prompt_len + len(call.ids) + 3  # the observation needs more than 3 tokens
    episode = run(engine, tokenizer, CalculatorEnv(), row, max_total_tokens=budget)
    assert engine.requests[0].sampling.max_new_tokens == len(call.ids) + 3
    assert episode.response_ids.tolist() == call.ids
    assert episode.finish_reason is FinishReason.LENGTH
    assert episode.metadata["truncated"] == "max_total_tokens"


def test_turn_cut_by_length_and_abort(tokenizer, row) -> None:
    cut = model_turn(tokenizer, "\n<tool_call>calcu", None, 0, 0)
    cut.finish_reason = "length"
    episode = run(ScriptedEngine([cut]), tokenizer, CalculatorEnv(), row)
    assert episode.finish_reason is FinishReason.LENGTH
    assert episode.metadata["truncated"] == "max_new_tokens"
    aborted = model_turn(tokenizer, "\n12", None, 0, 1)
    aborted.finish_reason = "abort"
    episode = run(ScriptedEngine([aborted]), tokenizer, CalculatorEnv(), row)
    assert episode.finish_reason is FinishReason.ABORT and episode.num_trainable == len(aborted.ids)


def test_turn_ending_on_another_stop_token_gets_the_observation_role(tokenizer, row) -> None:
    call = model_turn(tokenizer, tool_call_text("3*3"), "<|endoftext|>", 0, 0)
    final = model_turn(tokenizer, "\n9", "<|endoftext|>", 0, 1)
    episode = run(ScriptedEngine([call, final]), tokenizer, CalculatorEnv(), row)
    inserted = chat.observation_ids(tokenizer, ["9"], include_role=True)
    assert inserted[0] == tokenizer.convert_tokens_to_ids("<|observation|>")
    assert episode.response_ids.tolist() == call.ids + inserted + final.ids
    assert episode.loss_mask.tolist() == [1] * len(call.ids) + [0] * len(inserted) + [1] * len(
        final.ids
    )


class ExplodingEnv(CalculatorEnv):
    def step(self, assistant_text: str) -> StepResult:  # sync step, raising
        raise RuntimeError("tool backend down")


def test_env_failure_is_an_error_episode(tokenizer, row) -> None:
    call = model_turn(tokenizer, tool_call_text("1"), "<|observation|>", 0, 0)
    episode = run(ScriptedEngine([call]), tokenizer, ExplodingEnv(), row)
    assert episode.is_error
    assert episode.metadata["error"] == (
        "env ExplodingEnv.step raised RuntimeError: tool backend down"
    )
    assert episode.response_ids.tolist() == call.ids  # the tokens are kept


def test_real_engine_tokens_are_kept_exactly(tokenizer, row) -> None:
    """The embedded engine with a tiny random model: three turns joined by observations; the
    model's own recomputed logprobs at the trainable positions equal the rollout's, which
    holds only if every generated token was kept exactly where it was generated."""
    from rollout.embedded.engine import EmbeddedEngine
    from tests.envs.sample_envs import EchoEnv
    from tests.rollout.engine_helpers import tiny_model

    model = tiny_model(seed=1, vocab_size=512)
    assert len(tokenizer) <= 512
    engine = EmbeddedEngine(model, tokenizer=tokenizer, max_running=4, context_len=512, seed=0)
    try:
        # Stop on a broad set of ids so the random policy ends its turns quickly ("stop").
        sampling = SamplingParams(
            max_new_tokens=24,
            temperature=1.0,
            sampling_seed=7,
            stop_token_ids=list(range(20, 512, 3)),
        )
        episode = asyncio.run(
            run_episode(
                engine,
                tokenizer,
                EchoEnv(rounds=2),
                row,
                sampling,
                max_turns=3,
                max_total_tokens=500,
            )
        )
    finally:
        engine.shutdown()
    assert episode.metadata["turns"] == 3, episode.metadata
    assert episode.loss_mask.min() == 0 and episode.loss_mask.max() == 1
    inserted = ~episode.loss_mask.astype(bool)
    assert (episode.versions[inserted] == -1).all() and (
        episode.rollout_logprobs[inserted] == 0
    ).all()
    ids = torch.tensor(np.concatenate([episode.prompt_ids, episode.response_ids]).astype(np.int64))
    with torch.no_grad():
        recomputed = model.token_logprobs(ids, torch.tensor([0, len(ids)]), temperature=1.0)
    trainable = recomputed.logprobs[len(episode.prompt_ids) :][torch.from_numpy(~inserted)]
    np.testing.assert_allclose(
        trainable.float().numpy(), episode.rollout_logprobs[~inserted], atol=2e-3, rtol=0
    )
