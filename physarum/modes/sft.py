"""SFT: chat rows -> chat template -> Episodes masked on assistant turns -> cross-entropy steps.

The driver renders the next batch while the trainer trains on the current one. One rollout
worker serves held-out eval (greedy generation scored by the job's rewards).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import ray

from envs.tasks import read_jsonl
from models.tokenizer import load_tokenizer
from physarum.context import JobContext
from trainer.sft_data import sft_episodes


def run_sft(ctx: JobContext) -> dict[str, float]:
    job = ctx.job
    ctx.reserve(trainers=job.trainer.num_ranks, workers=1)
    trainer = ctx.start_trainer(store_url=None, total_steps=job.trainer.steps, policy_loss="sft")
    rollout = ctx.start_rollout(store_url=None)
    start = ctx.restore_latest(trainer)
    metrics = ctx.open_metrics(job.trainer.steps)
    rollout.push_weights(trainer.weight_update_ref(), start, wait=True)
    ctx.log(start, start, ctx.evaluate(rollout, start))
    batches = sft_batches(ctx, skip=start)

    pending = trainer.sft_step_async(next(batches))
    for step in range(start + 1, job.trainer.steps + 1):
        following = next(batches) if step < job.trainer.steps else None  # overlaps training
        result = ray.get(pending)
        if following is not None:
            pending = trainer.sft_step_async(following)
        if ctx.due(step, job.rollout.eval.interval) or step == job.trainer.steps:
            rollout.push_weights(trainer.weight_update_ref(), step, wait=True)
            result |= ctx.evaluate(rollout, step)
        if ctx.due(step, job.checkpoint.interval):
            ctx.checkpoint(trainer, step)
        ctx.log(step, step, result)

    ctx.checkpoint(trainer, job.trainer.steps)
    ctx.save_final(trainer)
    return {"steps": float(job.trainer.steps), **metrics.progress.last}


def sft_batches(ctx: JobContext, *, skip: int) -> Iterator[list[Any]]:
    """Endless batches of SFT Episodes: a seeded shuffle per epoch, `skip` batches dropped."""
    job = ctx.job
    tokenizer = load_tokenizer(ctx.prepared.tokenizer_dir)
    rows = read_jsonl(ctx.prepared.train_path)
    size = job.trainer.batch_size
    epoch, produced = 0, 0
    while True:
        order = list(range(len(rows)))
        if job.data.shuffle:
            random.Random(job.data.seed * 100_003 + epoch).shuffle(order)
        for begin in range(0, len(order) - size + 1, size):
            produced += 1
            if produced > skip:
                yield sft_episodes(tokenizer, [rows[i] for i in order[begin : begin + size]])
        epoch += 1
