"""Eval: rollout only. pass@k and accuracy of the model on the held-out rows."""

from __future__ import annotations

from physarum.context import JobContext


def run_eval(ctx: JobContext) -> dict[str, float]:
    job = ctx.job
    ctx.reserve(trainers=0, workers=job.rollout.num_workers)
    rollout = ctx.start_rollout(store_url=None)
    ctx.open_metrics(total_steps=1)
    result = ctx.evaluate(rollout, 0)
    ctx.log(0, 0, result)
    return result
