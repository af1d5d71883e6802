"""Held-out evaluation: k samples per prompt, scored by the job's rewards, reported as pass@k.

A sample is correct when its reward reaches `correct_min_reward`. We report the mean
per-sample accuracy (pass@1 estimated over k samples), pass@k with the unbiased estimator of
Chen et al. (2021), the mean reward and the generated tokens per second.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from buffer.episode import Episode

GenerateForRow = Callable[[dict[str, Any]], Awaitable[list[Episode]]]


@dataclass
class EvalResult:
    """Metrics (floats, keyed eval/...) and one record per sample (prompt id, text, reward)."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


async def evaluate_rows(
    rows: Sequence[dict[str, Any]],
    generate: GenerateForRow,
    score_group: Callable[[list[Episode]], Awaitable[None]],
    *,
    k: int,
    correct_min_reward: float = 1.0,
    concurrency: int = 64,
) -> EvalResult:
    """Evaluate every row (each `generate` call returns the k samples of one row)."""
    limit = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(row: dict[str, Any]) -> list[Episode]:
        async with limit:
            episodes = await generate(row)
            await score_group(episodes)
            return episodes

    groups = await asyncio.gather(*(one(row) for row in rows))
    elapsed = max(time.monotonic() - started, 1e-9)
    per_sample, at_k, rewards, tokens, errors = [], [], [], 0, 0
    for episodes in groups:
        correct = sum(e.reward >= correct_min_reward for e in episodes)
        per_sample.append(correct / len(episodes))
        at_k.append(pass_at_k(len(episodes), correct, min(k, len(episodes))))
        rewards.extend(e.reward for e in episodes)
        tokens += sum(e.num_trainable for e in episodes)
        errors += sum(e.is_error for e in episodes)
    n = max(len(groups), 1)
    samples = [
        {
            "id": row.get("id"),
            "sample": i,
            "response": e.metadata.get("response_text"),
            "reward": e.reward,
            "label": row.get("label"),
            "logprob": float(e.rollout_logprobs[e.loss_mask.astype(bool)].sum()),
            "tool_calls": e.metadata.get("num_tool_calls"),
            "turns": e.metadata.get("turns"),
            "tool_call_turns": sorted({c["turn"] for c in e.metadata.get("tool_calls", ())}),
            "finish_reason": str(e.finish_reason),
            "truncated": e.metadata.get("truncated"),
        }
        for row, episodes in zip(rows, groups, strict=True)
        for i, e in enumerate(episodes)
    ]
    metrics = {
        "eval/accuracy": sum(per_sample) / n,
        f"eval/pass@{k}": sum(at_k) / n,
        "eval/reward_mean": sum(rewards) / max(len(rewards), 1),
        "eval/prompts": float(len(groups)),
        "eval/errors": float(errors),
        "eval/gen_tokens_per_s": tokens / elapsed,
    }
    calls = [s["tool_calls"] for s in samples if s["tool_calls"] is not None]
    if calls:  # multi-turn episodes: how often the policy used a tool
        metrics["eval/tool_call_rate"] = sum(c > 0 for c in calls) / len(calls)
        metrics["eval/tool_calls_mean"] = sum(calls) / len(calls)
    return EvalResult(metrics, samples)
