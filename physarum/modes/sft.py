"""SFT: chat rows -> chat template -> Episodes masked on assistant turns -> cross-entropy steps.

The driver renders the next batch while the trainer trains on the current one. One rollout
worker serves held-out eval (greedy generation scored by the job's rewards).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import ray

from envs.tasks import read_jsonl
from models.tokenizer import load_tokenizer
from physarum.context import JobContext
from trainer.sft_data import sft_episodes

log = logging.getLogger(__name__)


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

    target = job.rollout.eval.stop_at_accuracy
    pending, last = trainer.sft_step_async(next(batches)), job.trainer.steps
    for step in range(start + 1, job.trainer.steps + 1):
        following = next(batches) if step < job.trainer.steps else None  # while it trains
        result = ray.get(pending)
        if ctx.due(step, job.rollout.eval.interval) or step == job.trainer.steps:
            rollout.push_weights(trainer.weight_update_ref(), step, wait=True)
            result |= ctx.evaluate(rollout, step)
        stop = target is not None and result.get("eval/accuracy", -1.0) >= target
        if ctx.due(step, job.checkpoint.interval) and not stop:
            ctx.checkpoint(trainer, step)
        if following is not None and not stop:
            # queued only now: the trainer actor runs calls in order, so the eval and the
            # checkpoint above must be taken before it starts the next step
            pending = trainer.sft_step_async(following)
        ctx.log(step, step, result)
        if stop:
            log.info("eval accuracy %.3f >= stop_at_accuracy %.3f: SFT ends at step %d",
                     result["eval/accuracy"], target, step)  # fmt: skip
            last = step
            break

    ctx.checkpoint(trainer, last)
    ctx.save_final(trainer)
    return {"steps": float(last), **metrics.progress.last}


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
