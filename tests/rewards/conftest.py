"""Shared helpers for the reward tests: episodes with a given response text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from buffer.episode import Episode


def episode_with(text: str, **metadata: Any) -> Episode:
    """A 3-token single-turn episode whose decoded response is `text`."""
    return Episode.from_generation(
        prompt_ids=[1, 2],
        response_ids=[5, 6, 7],
        logprobs=np.full(3, -0.5),
        versions=[0, 0, 0],
        finish_reason="stop",
        metadata={"response_text": text, **metadata},
    )


@pytest.fixture
def make_episode() -> Callable[..., Episode]:
    return episode_with
