"""Builders shared by the buffer tests and their worker processes (no pytest import, so
spawned processes start fast)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import redis

from buffer.episode import Episode, EpisodeGroup


def make_group(
    prompt_id: str, *, n: int = 2, response_len: int = 8, version: int = 0, seed: int = 0
) -> EpisodeGroup:
    """A group of n single-turn episodes whose tokens were all generated at `version`."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 1000, 5)
    episodes = [
        Episode.from_generation(
            prompt_ids=prompt,
            response_ids=rng.integers(0, 1000, response_len),
            logprobs=-rng.random(response_len).astype(np.float32),
            versions=np.full(response_len, version),
            finish_reason="stop",
            metadata={"sample": i},
        )
        for i in range(n)
    ]
    for i, episode in enumerate(episodes):
        episode.reward = float(i)
    return EpisodeGroup(prompt_id, episodes, {"prompt": prompt_id})


def write_prompts(path: Path, n: int, *, start: int = 0) -> Path:
    """A JSONL dataset of n well-formed rows with ids p<start>..p<start+n-1>."""
    with path.open("w") as fh:
        for i in range(start, start + n):
            row = {"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
            fh.write(json.dumps(row) + "\n")
    return path


def wait_aof_written(url: str) -> None:
    """Wait until the server has handed its AOF buffer to the kernel (survives a SIGKILL)."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while client.info("persistence").get("aof_buffer_length", 0) != 0:
        if time.monotonic() > deadline:
            raise AssertionError("redis never flushed its AOF buffer")
        time.sleep(0.01)
    client.close()
