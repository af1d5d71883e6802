"""Rejection sampling (RFT), in rounds: k samples per prompt -> rewards -> keep the accepted
(reward >= accept_min_reward, at most max_accepted_per_prompt per prompt) -> write them to
accepted/round_K.jsonl -> SFT on them -> push the new weights -> next round. A round that
accepts nothing stops the job with a UserError naming the threshold (no SFT on an empty set).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from buffer.episode import Episode
from envs.tasks import read_jsonl
from models.tokenizer import load_tokenizer
from physarum.context import JobContext
from physarum.errors import UserError
from physarum.step_guard import check_step


def run_rejection_sampling(ctx: JobContext) -> dict[str, float]:
    job = ctx.job
    rs = job.algorithm.rejection_sampling
    ctx.reserve(trainers=job.trainer.num_ranks, workers=job.rollout.num_workers)
    trainer = ctx.start_trainer(store_url=None, total_steps=job.trainer.steps, policy_loss="sft")
    rollout = ctx.start_rollout(store_url=None)
    rows = read_jsonl(ctx.prepared.train_path)
    random.Random(job.data.seed).shuffle(rows)
    tokenizer = load_tokenizer(ctx.prepared.tokenizer_dir)
    metrics = ctx.open_metrics(rs.rounds)
    rollout.push_weights(trainer.weight_update_ref(), 0, wait=True)
    ctx.log(0, 0, ctx.evaluate(rollout, 0))

    for round_index in range(1, rs.rounds + 1):
        prompts = _round_rows(rows, round_index, rs.prompts_per_round)
        groups = rollout.generate_rows(prompts, job.rollout.n_samples_per_prompt)
        samples = [e for g in groups for e in g]
        counts = {
            "data/episodes": len(samples),
            "data/error_episodes": sum(e.is_error for e in samples),
        }
        check_step(
            round_index, counts, job.reward.max_error_fraction, unit="rejection sampling round"
        )
        accepted = accept(groups, rs.accept_min_reward, rs.max_accepted_per_prompt)
        write_accepted(ctx.run.accepted(round_index), accepted, tokenizer)
        if not accepted:
            raise UserError(_nothing_accepted(round_index, groups, rs.accept_min_reward))
        result = _train_on(ctx, trainer, accepted)
        rollout.push_weights(trainer.weight_update_ref(), round_index, wait=True)
        samples = sum(len(g) for g in groups)
        result |= {
            "reward": sum(e.reward for g in groups for e in g) / max(samples, 1),
            "rs/accepted": float(len(accepted)),
            "rs/samples": float(samples),
            "rs/accept_rate": len(accepted) / max(samples, 1),
        }
        ctx.log(round_index, round_index, result | ctx.evaluate(rollout, round_index))

    ctx.checkpoint(trainer, rs.rounds)
    ctx.save_final(trainer)
    return {"rounds": float(rs.rounds), **metrics.progress.last}


def _nothing_accepted(round_index: int, groups: list[list[Episode]], min_reward: float) -> str:
    rewards = [e.reward for g in groups for e in g if not e.is_error]
    best = f"{max(rewards):g}" if rewards else "none (every sample failed)"
    return (
        f"rejection sampling round {round_index}: none of {sum(len(g) for g in groups)} samples "
        f"reached algorithm.rejection_sampling.accept_min_reward = {min_reward:g} (best reward: "
        f"{best}), so there is nothing to train on; lower accept_min_reward or raise "
        "rollout.n_samples_per_prompt"
    )


def _round_rows(rows: list[dict], round_index: int, n: int) -> list[dict]:
    begin = ((round_index - 1) * n) % max(len(rows), 1)
    return [rows[(begin + i) % len(rows)] for i in range(n)]


def accept(groups: list[list[Episode]], min_reward: float, per_prompt: int) -> list[Episode]:
    """The first `per_prompt` samples of each group whose reward reaches `min_reward`."""
    kept = []
    for episodes in groups:
        good = [e for e in episodes if not e.is_error and e.reward >= min_reward]
        kept.extend(good[:per_prompt])
    return kept


def write_accepted(path: Path, episodes: list[Episode], tokenizer: object) -> None:
    with path.open("w") as f:
        for e in episodes:
            f.write(
                json.dumps(
                    {
                        "id": e.metadata.get("prompt_id") or e.metadata.get("id"),
                        "task": e.metadata.get("task"),
                        "label": e.metadata.get("label"),
                        "prompt": tokenizer.decode(e.prompt_ids.tolist()),
                        "response": tokenizer.decode(e.response_ids.tolist()),
                        "reward": e.reward,
                        "prompt_ids": e.prompt_ids.tolist(),
                        "response_ids": e.response_ids.tolist(),
                    }
                )
                + "\n"
            )


def _train_on(ctx: JobContext, trainer, accepted: list[Episode]) -> dict[str, float]:
    rs, size = ctx.job.algorithm.rejection_sampling, ctx.job.trainer.batch_size
    result: dict[str, float] = {}
    order = list(range(len(accepted)))
    for epoch in range(rs.sft_epochs_per_round):
        random.Random(epoch).shuffle(order)
        for begin in range(0, len(order), size):
            batch = [_as_sft(accepted[i]) for i in order[begin : begin + size]]
            result = trainer.sft_step(batch)
    return result


def _as_sft(episode: Episode) -> Episode:
    """An accepted sample as an SFT example: the generated tokens, all trainable."""
    return Episode(
        prompt_ids=episode.prompt_ids,
        response_ids=episode.response_ids,
        loss_mask=episode.loss_mask,
        rollout_logprobs=episode.rollout_logprobs,
        versions=episode.versions,
        reward=episode.reward,
        metadata={"id": episode.metadata.get("id")},
    )
