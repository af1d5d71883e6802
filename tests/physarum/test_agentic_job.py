"""The agentic pipeline, small enough for CI: warm start on tool-use demonstrations, then RL.

A tiny model is SFT'd in-process (the trainer service, no Ray) on calculator demonstrations
until it writes GLM tool calls; from it, (1) the rollout worker of the RL job runs real
multi-turn episodes, whose masks, logprobs and versions are checked token by token against
the calculator, and (2) the whole `toy_agentic.yaml` RL job runs for 3 steps on an embedded
Ray and Redis and must report the tool-call rate of its held-out evals.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from configs import JobConfig, load_job
from envs.tasks import read_jsonl
from physarum.launch import execute
from physarum.prepare import export_final, prepare
from physarum.rundir import RunDir

# At 80 steps of constant lr 2e-2 one row-sampling seed in 6 left a model that never called
# the calculator; at 120 with a cosine decay, 15 seeds of 15 called it on 2-4 of the 4
# probe prompts (8-16 of 16 samples; a prompt's samples mostly agree).
SFT_STEPS = 120
TINY_SFT = [
    "model.preset=glm4moe-tiny",
    "data.n_train=64",
    "data.n_eval=8",
    "data.demonstration_fraction=1.0",  # every row a demonstration: the tiny model must call
    "trainer.batch_size=16",
    f"trainer.steps={SFT_STEPS}",
    "trainer.lr=2e-2",
    "trainer.warmup_steps=0",
    "trainer.lr_schedule=cosine",
]
TINY_RL = [
    "data.n_train=64",
    "data.n_eval=8",
    "rollout.n_samples_per_prompt=4",
    "rollout.prompts_per_lease=2",
    "rollout.max_running=32",
    "rollout.eval.n_prompts=8",
    "rollout.eval.k=1",
    "rollout.eval.interval=2",
    "trainer.prompts_per_step=2",
    "trainer.steps=3",
    "trainer.lr=1e-3",
    "checkpoint.interval=2",
    "cluster.num_cpus=2",
    "rollout.request_timeout_s=120",
]


def _warm_start(root: Path) -> Path:
    """SFT a tiny model on demonstrations with the job's own trainer service; its HF dir."""
    from models.tokenizer import load_tokenizer
    from trainer.service import TrainerService
    from trainer.sft_data import sft_episodes

    job = load_job(Path("configs/toy_agentic_sft.yaml"), [f"run_dir={root}", *TINY_SFT])
    run = RunDir(root).create()
    prepared = prepare(job, run)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    rows = read_jsonl(prepared.train_path)
    trainer = TrainerService(
        job, prepared.model_dir, store=None, total_steps=SFT_STEPS, policy_loss="sft"
    )
    rng = random.Random(0)
    for _ in range(SFT_STEPS):
        trainer.sft_step(sft_episodes(tokenizer, rng.sample(rows, job.trainer.batch_size)))
    trainer.save_hf(run.hf)
    return export_final(prepared.model_dir, prepared.tokenizer_dir, run.hf)


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return _warm_start(tmp_path_factory.mktemp("agentic_sft"))


def _rl_job(run_dir: Path, model: Path) -> JobConfig:
    overrides = [f"run_dir={run_dir}", f"model.path={model}", f"tokenizer.path={model}"]
    return load_job(Path("configs/toy_agentic.yaml"), [*overrides, *TINY_RL])


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory: pytest.TempPathFactory, warm_model: Path) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("agentic_rl")
    return run_dir, execute(_rl_job(run_dir, warm_model))


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of mask == 0."""
    spans, start = [], None
    for i, m in enumerate([*mask.tolist(), 1]):
        if m == 0 and start is None:
            start = i
        elif m == 1 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _rollout_episodes(job: JobConfig, model: Path, rows: list[dict[str, Any]]) -> tuple:
    """Training-time episodes (the job's sampling, n per row) from the job's rollout worker."""
    from rollout.producer import sampling_from_config
    from rollout.worker import RolloutWorkerCore

    core = RolloutWorkerCore(job, model_dir=model, tokenizer_dir=model, worker_id="check")
    sampling = sampling_from_config(job.rollout, core.stop_ids, seed=job.seed)

    async def run() -> list:
        groups = [
            await core.generate_for_row(r, sampling, job.rollout.n_samples_per_prompt) for r in rows
        ]
        for group in groups:
            await core.reward_fn.score_group(group)
        return groups

    try:
        return asyncio.run(run()), core.tokenizer
    finally:
        core.shutdown()


def _expected_result(call: dict[str, Any]) -> str | None:
    """What the calculator answers to a parsed call; None when it must answer an error."""
    from rewards.safe_eval import SafeEvalError, SafeEvaluator, format_number

    if call["name"] != "calculator" or set(call["arguments"]) != {"expression"}:
        return None
    try:
        return format_number(SafeEvaluator().value(str(call["arguments"]["expression"])))
    except SafeEvalError:
        return None


def test_tool_observations_enter_with_mask_zero(tmp_path: Path, warm_model: Path) -> None:
    from rewards.builtins.toy_tasks import calculator_answer_score

    job = _rl_job(tmp_path, warm_model)
    rows = read_jsonl(warm_model.parent / "data" / "eval.jsonl")[:4]
    groups, tokenizer = _rollout_episodes(job, warm_model, rows)
    episodes = [e for g in groups for e in g]
    with_tools = [e for e in episodes if e.metadata["num_tool_calls"] > 0]
    # enough tool episodes to check token by token: at least one prompt's group
    assert len(with_tools) >= len(episodes) // 4, "the warm start should call the calculator"
    observation_id = tokenizer.convert_tokens_to_ids("<|observation|>")
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    checked = 0
    for episode in with_tools:
        mask, ids = episode.loss_mask, np.asarray(episode.response_ids)
        versions, logprobs = np.asarray(episode.versions), np.asarray(episode.rollout_logprobs)
        # the policy's tokens: version 0 (the weights the engine holds), a real logprob
        assert (versions[mask == 1] == 0).all()
        assert (logprobs[mask == 1] < 0).all()
        # inserted tokens: no policy made them
        assert (versions[mask == 0] == -1).all() and (logprobs[mask == 0] == 0).all()
        spans = _spans(mask)
        if episode.finish_reason == "stop":  # one observation between consecutive turns
            assert len(spans) == episode.metadata["turns"] - 1
        for turn, (start, end) in enumerate(spans):
            # the model ended its turn on <|observation|> (or the loop inserted it)
            assert observation_id in (ids[start - 1], ids[start])
            assert ids[end - 1] == assistant_id  # the observation hands the turn back
            text = tokenizer.decode(ids[start:end].tolist())
            calls = [c for c in episode.metadata["tool_calls"] if c["turn"] == turn]
            for call in calls:
                expected = _expected_result(call)
                assert (f"\n{expected}\n" if expected else "error") in text, (text, call)
                checked += 1
        # scored by the calculator task on the last model turn against the row's label
        label = episode.metadata["label"]
        assert episode.reward == calculator_answer_score(episode.metadata["final_text"], label)
    assert checked > 0


def test_agentic_rl_job_reports_tool_use(rl_run: tuple[Path, dict]) -> None:
    run_dir, result = rl_run
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert sorted(r["step"] for r in steps) == [1, 2, 3]
    for record in steps:
        assert record["data/episodes"] == 8  # 2 prompts x 4 samples
        assert record["data/error_episodes"] == 0
        assert record["buffer/staleness_max"] <= 1  # max_staleness of the preset
        assert record["train/version"] == record["step"]
    evals = [r for r in records if "eval/tool_call_rate" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert 0.0 < evals[0]["eval/tool_call_rate"] <= 1.0
    assert "eval/tool_call_rate" in result and result["steps"] == 3
    samples = [json.loads(x) for x in (run_dir / "eval" / "step_3.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    called = [s for s in samples if s["tool_calls"]]
    assert len(called) / len(samples) == pytest.approx(result["eval/tool_call_rate"])
    for sample in called:
        _check_every_call_was_answered(sample)


def _check_every_call_was_answered(sample: dict) -> None:
    """The calculator's answer (or its error) comes back after every turn with a call, except
    a last turn that ended the episode: the turn limit, or an observation that did not fit
    the context (rollout.multiturn drops it rather than cut it)."""
    turns, call_turns = sample["turns"], sample["tool_call_turns"]
    answered_turns = [t for t in call_turns if t < turns - 1]
    assert sample["response"].count("<tool_response>") >= len(answered_turns), sample
    if turns - 1 in call_turns:  # a call in the last turn: only a limit may have ended it
        assert sample["truncated"] in ("max_turns", "max_total_tokens", "max_new_tokens"), sample


def test_demonstration_fraction_mixes_tool_use_and_direct_answers(tmp_path: Path) -> None:
    """data.demonstration_fraction 0.25: every 4th train row demonstrates the tool call, the
    rest answer directly with the label; the held-out rows stay bare prompts."""
    overrides = [f"run_dir={tmp_path}", "model.preset=glm4moe-tiny", "data.n_train=12"]
    job = load_job(
        Path("configs/toy_agentic_sft.yaml"), [*overrides, "data.demonstration_fraction=0.25"]
    )
    prepared = prepare(job, RunDir(tmp_path).create())
    rows = read_jsonl(prepared.train_path)
    demonstrated = [any(m.get("tool_calls") for m in r["messages"]) for r in rows]
    assert demonstrated == [i % 4 == 3 for i in range(12)]
    for row, demo in zip(rows, demonstrated, strict=True):
        roles = [m["role"] for m in row["messages"]]
        tail = ["assistant", "tool", "assistant"] if demo else []
        assert roles == ["system", "user", *tail]
        assert row["tools"][0]["function"]["name"] == "calculator"
    assert all(len(r["messages"]) == 2 for r in read_jsonl(prepared.eval_path))
