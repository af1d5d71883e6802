"""Episode.from_generation builds the same record as the constructor, and refuses the same
inputs with the same field named (it converts and validates without the dataclass path)."""

from __future__ import annotations

import numpy as np
import pytest

from buffer.episode import Episode, EpisodeError, FinishReason

FIELDS = ("prompt_ids", "response_ids", "loss_mask", "rollout_logprobs", "versions")


def _both(prompt, response, logprobs, versions, **kw):
    fast = Episode.from_generation(prompt, response, logprobs, versions, "length", **kw)
    slow = Episode(
        prompt_ids=prompt,
        response_ids=response,
        loss_mask=np.ones(len(response), np.uint8),
        rollout_logprobs=logprobs,
        versions=versions,
        finish_reason="length",
        metadata=dict(kw.get("metadata") or {}),
        routed_experts=kw.get("routed_experts"),
        routing_start=len(prompt) if kw.get("routing_start") is None else kw["routing_start"],
    )
    return fast, slow


def test_same_record_as_the_constructor() -> None:
    routed = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)
    for kw in ({}, {"metadata": {"task": "t"}, "routed_experts": routed}):
        fast, slow = _both([1, 2, 3], [7, 8, 9, 10, 11], [-0.5, -1.0, 0.0, -2.0, -0.1],
                           [3, 3, 4, 4, 4], **kw)  # fmt: skip
        for name in FIELDS:
            a, b = getattr(fast, name), getattr(slow, name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert fast.finish_reason is FinishReason.LENGTH
        assert (fast.reward, fast.rewards, fast.metadata, fast.routing_start) == (
            slow.reward, slow.rewards, slow.metadata, slow.routing_start
        )  # fmt: skip
        assert fast.metadata is not kw.get("metadata")  # a copy, as before
        if kw:
            assert np.array_equal(fast.routed_experts, routed) and fast.routing_start == 3


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1], [5, 6], [-0.1], [0, 0]), "rollout_logprobs: length 1"),
        (([1], [5, 6], [-0.1, -0.2], [0]), "versions: length 1"),
        (([1], [5, 6], [-0.1, float("nan")], [0, 0]), "rollout_logprobs: contains NaN"),
        (([[1]], [5], [-0.1], [0]), "prompt_ids: expected a 1-D array"),
        (([1], [5], [-0.1], [0], "weird"), "is not a valid FinishReason"),
    ],
)
def test_bad_input_is_refused_naming_the_field(args, match) -> None:
    prompt, response, logprobs, versions, *finish = args
    with pytest.raises(ValueError, match=match):
        Episode.from_generation(prompt, response, logprobs, versions, *(finish or ["stop"]))


def test_routing_past_the_tokens_is_refused() -> None:
    with pytest.raises(EpisodeError, match="routed_experts"):
        Episode.from_generation([1], [5, 6], [-0.1, -0.2], [0, 0], "stop",
                                routed_experts=np.zeros((3, 1, 1), np.uint8))  # fmt: skip
