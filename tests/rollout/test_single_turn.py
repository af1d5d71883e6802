"""Single-turn groups: n samples -> Episodes with logprobs, versions, finish reasons, texts."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from buffer.episode import FinishReason
from envs.tasks import make_rows, tokenizer_corpus
from models import chat
from models.tokenizer import build_toy_tokenizer, stop_token_ids
from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from rollout.single_turn import generate_group, row_metadata
from rollout.types import SamplingParams
from tests.rollout.test_multiturn import ScriptedEngine, Turn

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_toy_tokenizer(
        tmp_path_factory.mktemp("toy_tokenizer"), tokenizer_corpus(n_per_task=200, seed=0)
    )


def test_group_of_arithmetic_samples(tokenizer) -> None:
    row = make_rows("arithmetic", 1, seed=3)[0]
    label = row["label"]
    eos = tokenizer.eos_token_id
    answers = [chat.encode(tokenizer, label) + [eos], chat.encode(tokenizer, "12") + [eos]]
    cut = chat.encode(tokenizer, label + "000")
    turns = [
        Turn(answers[0], [-0.1] * len(answers[0]), [5] * len(answers[0])),
        Turn(answers[1], [-0.2] * len(answers[1]), [6] * len(answers[1])),
        Turn(cut, [-0.3] * len(cut), [6] * len(cut), finish_reason="length"),
    ]
    engine = ScriptedEngine(turns)
    prompt = chat.prompt_ids(tokenizer, row["messages"])
    sampling = SamplingParams(max_new_tokens=8, sampling_seed=100, stop_token_ids=[eos])
    episodes = asyncio.run(
        generate_group(engine, prompt, sampling, 3, metadata=row_metadata(row), tokenizer=tokenizer)
    )

    assert [r.sampling.sampling_seed for r in engine.requests] == [100, 101, 102]
    assert all(r.sampling.n == 1 and r.input_ids == prompt for r in engine.requests)
    # each sample's params are the group's with its own n and seed; the group's are untouched
    assert [r.sampling for r in engine.requests] == [
        replace(sampling, n=1, sampling_seed=100 + i) for i in range(3)
    ]
    assert sampling.n == 1 and sampling.sampling_seed == 100
    # the tokenizer decodes the responses here, so the engine is not asked for text
    assert not any(r.return_text for r in engine.requests)
    assert len({r.rid for r in engine.requests}) == 3
    for episode, turn in zip(episodes, turns):
        assert episode.prompt_ids.tolist() == prompt
        assert episode.response_ids.tolist() == turn.ids
        assert episode.loss_mask.tolist() == [1] * len(turn.ids)
        np.testing.assert_array_equal(episode.rollout_logprobs, np.float32(turn.logprobs))
        assert episode.versions.tolist() == turn.versions
    assert [e.finish_reason for e in episodes] == [
        FinishReason.STOP,
        FinishReason.STOP,
        FinishReason.LENGTH,
    ]
    texts = [e.metadata["response_text"] for e in episodes]
    assert texts == [label, "12", label + "000"]  # the stop token is not part of the text
    assert episodes[0].metadata["prompt_text"] == tokenizer.decode(prompt)
    assert [e.metadata["sample_index"] for e in episodes] == [0, 1, 2]
    assert episodes[0].metadata["label"] == label and episodes[0].metadata["task"] == "arithmetic"

    with build_reward_fn([RewardSpec("arithmetic")], timeout_s=5) as reward_fn:
        asyncio.run(reward_fn.score_group(episodes))
    assert [e.reward for e in episodes] == [1.0, 0.0, 0.0]


def test_engine_text_is_used_without_a_tokenizer_and_stop_strings_are_trimmed(
    tokenizer,
) -> None:
    ids = chat.encode(tokenizer, "42 END")
    engine = ScriptedEngine([Turn(ids, [0.0] * len(ids), [0] * len(ids))])
    (episode,) = asyncio.run(
        generate_group(engine, [1, 2], SamplingParams(), 1, metadata={"prompt_id": "p"})
    )
    assert "response_text" not in episode.metadata  # the scripted engine returns no text

    class TextEngine(ScriptedEngine):
        async def generate(self, requests):
            outputs = await super().generate(requests)
            for output in outputs:
                output.text, output.matched_stop = "42", " END"
            return outputs

    engine = TextEngine([Turn(ids, [0.0] * len(ids), [0] * len(ids))])
    (episode,) = asyncio.run(
        generate_group(engine, [1, 2], SamplingParams(), 1, metadata={"prompt_id": "p"})
    )
    assert episode.metadata["response_text"] == "42"
    engine = TextEngine([Turn(ids, [0.0] * len(ids), [0] * len(ids))])
    (episode,) = asyncio.run(
        generate_group(engine, [1, 2], SamplingParams(), 1, metadata={}, tokenizer=tokenizer)
    )
    assert episode.metadata["response_text"] == "42"  # decoded, stop string removed


def test_countdown_row_metadata_reaches_the_reward(tokenizer) -> None:
    row = make_rows("countdown", 1, seed=1)[0]
    solution = row["metadata"]["solution"]
    ids = chat.encode(tokenizer, solution) + [stop_token_ids(tokenizer)[0]]
    engine = ScriptedEngine([Turn(ids, [-1.0] * len(ids), [0] * len(ids))])
    episodes = asyncio.run(
        generate_group(
            engine,
            chat.prompt_ids(tokenizer, row["messages"]),
            SamplingParams(stop_token_ids=stop_token_ids(tokenizer)),
            1,
            metadata=row_metadata(row),
            tokenizer=tokenizer,
        )
    )
    assert episodes[0].metadata["numbers"] == row["metadata"]["numbers"]
    with build_reward_fn([RewardSpec("countdown")], timeout_s=5) as reward_fn:
        asyncio.run(reward_fn.score_group(episodes))
    assert episodes[0].reward == 1.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="reserved"):
        row_metadata({"id": "x", "metadata": {"label": "1"}})
    ids = [1, 2]
    broken = ScriptedEngine([Turn(ids, [0.0], [0, 0])])
    with pytest.raises(ValueError, match="logprobs has 1"):
        asyncio.run(generate_group(broken, [1], SamplingParams(), 1, metadata={}))
