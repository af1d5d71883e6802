"""RL (PPO and the GRPO family), asynchronous by default. Reads like slime's train_async.py.

Rollout workers produce continuously; each worker may run at most `max_staleness` versions
ahead of the weights it holds, so `max_staleness: 0` is the synchronous on-policy case and
the same loop serves both. Weights are pushed after every step and swapped between decode
steps (partial rollouts carry per-token versions).
"""

from __future__ import annotations

import time

from physarum.context import JobContext
from physarum.step_guard import check_step


def run_rl(ctx: JobContext) -> dict[str, float]:
    job = ctx.job
    ctx.reserve(trainers=job.trainer.num_ranks, workers=job.rollout.num_workers, buffer=True)
    buffer = ctx.start_buffer(prompts=ctx.prepared.train_path)
    trainer = ctx.start_trainer(store_url=buffer.url, total_steps=job.trainer.steps)
    rollout = ctx.start_rollout(store_url=buffer.url)
    start = ctx.restore_latest(trainer)
    rollout.push_weights(trainer.weight_update_ref(), start, wait=True)
    metrics = ctx.open_metrics(job.trainer.steps)
    ctx.log(start, start, ctx.evaluate(rollout, start))
    rollout.start()

    timeout = job.rollout.request_timeout_s
    queued = trainer.submit_rl_step(timeout) if start < job.trainer.steps else None
    for step in range(start + 1, job.trainer.steps + 1):
        assert queued is not None
        # A step's call ends with the export of its weights (queued.update). Queued behind it
        # before its result is back (a rank runs its calls in order): the next step, which
        # so starts the moment the export ends, with no round trip through the driver. A
        # checkpoint must see this step's state, so across one the next step is queued only
        # after it. The update goes to the workers only once the step is done: a restarted
        # worker waits for the latest update before it produces, and this step may still
        # wait for that worker's groups.
        checkpoint_due = ctx.due(step, job.checkpoint.interval)
        more = step < job.trainer.steps
        following = trainer.submit_rl_step(timeout) if more and not checkpoint_due else None
        result = trainer.rl_step_result(queued, while_waiting=rollout.check)
        check_step(step, result, job.reward.max_error_fraction)
        rollout.push_weights(queued.update, step, wait=False)
        queued = following
        if step < job.trainer.steps and ctx.due(step, job.rollout.eval.interval):
            result |= ctx.evaluate(rollout, step)  # the last step's eval runs once, after stop
        if checkpoint_due:
            ctx.checkpoint(trainer, step)
            queued = trainer.submit_rl_step(timeout) if more else None
        ctx.log(step, step, result | rollout.stats() | _buffer_metrics(buffer.stats()))

    ctx.checkpoint(trainer, job.trainer.steps)  # first: a stuck worker cannot cost the model
    unconsumed_at_stop = float(buffer.stats().get("groups_unconsumed", 0))
    stopping = time.monotonic()
    rollout.stop()  # bounded: aborts generation and drops groups still waiting for room
    stop_seconds = time.monotonic() - stopping
    final = ctx.evaluate(rollout, job.trainer.steps)
    final["rollout/stop_seconds"] = stop_seconds
    final["rollout/groups_dropped"] = rollout.stats().get("rollout/groups_dropped", 0.0)
    final["buffer/groups_unconsumed_at_stop"] = unconsumed_at_stop  # produced, never trained on
    ctx.log(job.trainer.steps, job.trainer.steps, final)
    ctx.save_final(trainer)
    return {**final, "steps": float(job.trainer.steps), **metrics.progress.last}


def _buffer_metrics(stats: dict) -> dict[str, float]:
    keys = (
        "groups_unconsumed",
        "groups_pending",
        "drops_stale",
        "late_pushes",
        "lease_expiries",
        "prompts_queued",
        "epoch",
    )
    out = {f"buffer/{k}": float(stats[k]) for k in keys if k in stats}
    # groups handed to the trainer so far, per staleness (cumulative histogram)
    for staleness, count in (stats.get("staleness_hist") or {}).items():
        out[f"buffer/staleness_hist/{staleness}"] = float(count)
    return out
