"""Fault-injecting plugins for the job fault tests (loaded by import path)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def die_once(episode, flag: str) -> float:
    """Kill the rollout worker process the first time it scores a training episode."""
    path = Path(flag)
    if episode.metadata.get("split") == "train" and not path.exists():
        path.write_text("killed")
        os._exit(1)
    return 0.0


def die_once_in_eval(episode, flag: str) -> float:
    """Kill the rollout worker process the first time it scores a held-out (eval) episode."""
    path = Path(flag)
    if episode.metadata.get("split") != "train" and not path.exists():
        path.write_text("killed")
        os._exit(1)
    return 0.0


def flaky(episode) -> float:
    """Raise on every third sample: those episodes become errors, the job goes on."""
    if episode.metadata.get("sample_index", 0) % 3 == 2:
        raise RuntimeError("flaky reward failed on purpose")
    return 0.0


class HangingEnv:
    """Answers held-out (eval) episodes at once but never returns from a training episode's
    reset: training rollout stalls for good while eval still works.

    env.reset runs on the worker's event loop, so hanging there stops the whole worker, as
    a bug in worker code would. (A hung env.step no longer does: each step runs in its own
    thread under env.step_timeout_s, and the worker's other episodes go on.)"""

    tools: list = []

    def reset(self, row):
        if (row.get("metadata") or {}).get("split") == "train":
            time.sleep(3600)
        return list(row["messages"])

    def step(self, text):
        from envs.base import StepResult

        return StepResult(observations=[], reward=None, done=True)
