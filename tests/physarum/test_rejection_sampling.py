"""Rejection sampling's driver on stand-in trainer/rollout handles: acceptance by threshold,
k samples per prompt, the JSONL of each round, round 2 sampling from round 1's model, and a
round that accepts nothing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import physarum.modes.rejection_sampling as rs_mode
from buffer.episode import Episode
from configs.loader import validate_job
from physarum.errors import UserError
from physarum.modes.rejection_sampling import accept, run_rejection_sampling


def _episode(reward: float, prompt: int = 1, sample: int = 0, error: bool = False) -> Episode:
    e = Episode(
        prompt_ids=[prompt, prompt],
        response_ids=[10 + sample, 11],
        loss_mask=np.ones(2),
        rollout_logprobs=np.full(2, -0.1),
        versions=np.zeros(2),
        reward=reward,
        metadata={"id": f"p{prompt}", "task": "toy", "label": str(prompt)},
    )
    if error:
        e.mark_error("engine failed")
        e.reward = reward  # an error episode is never accepted, whatever its reward says
    return e


def test_accept_keeps_rewards_at_or_above_the_threshold_up_to_the_per_prompt_cap() -> None:
    groups = [
        [_episode(0.4), _episode(0.5, sample=1), _episode(0.9, sample=2), _episode(1.0, sample=3)],
        [_episode(0.49, 2), _episode(0.2, 2, 1)],
        [_episode(1.0, 3, error=True), _episode(0.7, 3, 1)],
    ]
    kept = accept(groups, min_reward=0.5, per_prompt=2)
    # first two reaching 0.5 of prompt 1 (0.5 counts: >=), none of prompt 2, no error sample
    assert [(e.metadata["id"], e.reward) for e in kept] == [("p1", 0.5), ("p1", 0.9), ("p3", 0.7)]
    assert len(accept(groups, min_reward=0.5, per_prompt=1)) == 2
    assert accept(groups, min_reward=1.01, per_prompt=4) == []


class _Trainer:
    """Counts SFT steps; its weight ref names the model state (steps taken so far)."""

    def __init__(self) -> None:
        self.steps, self.batches = 0, []

    def weight_update_ref(self) -> dict:
        return {"after_sft_steps": self.steps}

    def sft_step(self, batch: list[Episode]) -> dict[str, float]:
        self.steps += 1
        self.batches.append(batch)
        return {"train/loss": 1.0 / self.steps}


class _Rollout:
    """k samples per prompt; sample j's reward is 1 when j < (1 + SFT steps behind the pushed
    weights), so a better model (more steps) gets more samples accepted."""

    def __init__(self, reward_of=None) -> None:
        self.weights, self.pushed, self.calls = None, [], []
        self.reward_of = reward_of or (lambda j, weights: float(j < 1 + weights["after_sft_steps"]))

    def push_weights(self, ref: dict, version: int, wait: bool) -> None:
        self.weights = ref
        self.pushed.append((version, ref))

    def generate_rows(self, rows: list[dict], n: int) -> list[list[Episode]]:
        self.calls.append((len(rows), n, self.weights))
        return [
            [_episode(self.reward_of(j, self.weights), int(r["id"][1:]), j) for j in range(n)]
            for r in rows
        ]


def _ctx(tmp_path: Path, rollout: _Rollout, **rs) -> SimpleNamespace:
    rows = [
        {"id": f"p{i}", "messages": [{"role": "user", "content": f"{i}"}], "label": f"{i}",
         "task": "toy"}
        for i in range(6)
    ]  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = validate_job(
        {
            "mode": "rejection_sampling",
            "name": "rs",
            "reward": {"plugins": [{"name": "arithmetic"}]},
            "rollout": {"n_samples_per_prompt": 4},
            "trainer": {"batch_size": 2},
            "algorithm": {"rejection_sampling": {"rounds": 2, "prompts_per_round": 3,
                                                 "max_accepted_per_prompt": 4} | rs},
        }
    )  # fmt: skip
    (tmp_path / "accepted").mkdir()
    trainer, logged = _Trainer(), []
    return SimpleNamespace(
        job=job,
        trainer=trainer,
        logged=logged,
        reserve=lambda **kw: None,
        start_trainer=lambda **kw: trainer,
        start_rollout=lambda **kw: rollout,
        prepared=SimpleNamespace(train_path=train, tokenizer_dir=tmp_path),
        open_metrics=lambda n: SimpleNamespace(progress=SimpleNamespace(last={})),
        log=lambda step, version, metrics: logged.append((step, metrics)),
        evaluate=lambda rollout, version: {},
        run=SimpleNamespace(accepted=lambda k: tmp_path / "accepted" / f"round_{k}.jsonl"),
        checkpoint=lambda trainer, step: None,
        save_final=lambda trainer: None,
    )


@pytest.fixture(autouse=True)
def _decode_tokens(monkeypatch) -> None:
    tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    monkeypatch.setattr(rs_mode, "load_tokenizer", lambda path: tokenizer)


def test_rounds_sample_k_per_prompt_write_jsonl_and_round_two_uses_round_one_model(
    tmp_path,
) -> None:
    rollout = _Rollout()
    ctx = _ctx(tmp_path, rollout)
    run_rejection_sampling(ctx)
    # k = 4 samples for each of the 3 prompts of a round
    assert [(n_rows, n) for n_rows, n, _ in rollout.calls] == [(3, 4), (3, 4)]
    # round 1 sampled the initial weights; round 2 the weights after round 1's SFT
    round1_weights, round2_weights = rollout.calls[0][2], rollout.calls[1][2]
    assert round1_weights == {"after_sft_steps": 0}
    assert round2_weights == {"after_sft_steps": 2}  # 3 accepted / batch_size 2 = 2 steps
    assert [v for v, _ in rollout.pushed] == [0, 1, 2]
    # the JSONL of each round: one line per accepted sample, with ids and text
    lines = [
        json.loads(x) for x in (tmp_path / "accepted" / "round_1.jsonl").read_text().splitlines()
    ]
    # (rows are shuffled by data.seed: round 1 takes 3 prompts, round 2 the other 3)
    assert len({r["id"] for r in lines}) == 3
    assert all((r["reward"], r["response_ids"]) == (1.0, [10, 11]) for r in lines)
    n = lines[0]["id"][1:]
    assert lines[0]["prompt"] == f"{n} {n}" and lines[0]["response"] == "10 11"
    assert lines[0]["label"] == n and lines[0]["task"] == "toy"
    round2 = (tmp_path / "accepted" / "round_2.jsonl").read_text().splitlines()
    assert len(round2) == 3 * 3  # the better model: samples 0..2 of each prompt accepted
    ids_2 = {json.loads(x)["id"] for x in round2}
    assert len(ids_2) == 3 and not ids_2 & {r["id"] for r in lines}
    # SFT trained exactly on the accepted samples, every token of them
    trained = [e for batch in ctx.trainer.batches for e in batch]
    assert len(trained) == 3 + 9 and all(e.loss_mask.sum() == 2 for e in trained)
    metrics = dict(ctx.logged)
    assert metrics[1]["rs/accepted"] == 3 and metrics[1]["rs/accept_rate"] == 3 / 12
    assert metrics[2]["rs/accepted"] == 9


def test_a_round_that_accepts_nothing_stops_with_a_clear_message(tmp_path) -> None:
    rollout = _Rollout(reward_of=lambda j, weights: 0.25 * j / 3)
    ctx = _ctx(tmp_path, rollout, accept_min_reward=0.5)
    with pytest.raises(UserError) as info:
        run_rejection_sampling(ctx)
    message = str(info.value)
    assert "round 1: none of 12 samples" in message
    assert "accept_min_reward = 0.5" in message and "best reward: 0.25" in message
    assert ctx.trainer.steps == 0  # never trained on an empty set
    assert (tmp_path / "accepted" / "round_1.jsonl").read_text() == ""
