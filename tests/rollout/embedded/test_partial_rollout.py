"""Partial rollouts (rollout.partial_rollout): an update mid-generation either lands between
two decode steps (the sequence carries both versions, in order) or, in non-partial mode,
waits until the running sequences finish while nothing new is admitted. Then how the
trainer's staleness rule (the group's oldest version) and masking treat a two-version
episode, and the rollout's count of such episodes."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import torch

from buffer.episode import Episode, EpisodeGroup
from models import build_weight_update
from rollout.embedded import EmbeddedEngine
from rollout.types import GenerateRequest, SamplingParams
from rollout.worker import spans_versions
from tests.rollout.engine_helpers import greedy_reference, tiny_model
from trainer.step_arrays import step_arrays

torch.set_num_threads(1)

PROMPT, LATE_PROMPT = [1, 2, 3, 4], [5, 6]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def run_update_mid_generation(partial: bool) -> tuple[object, object, list[bool], object]:
    """A 24-token greedy generation; after its token 8 the engine thread queues an update to
    version 7 and, right behind it, a second request. Returns (first sequence, second one,
    whether the update was applied as seen after tokens 9..24 of the first, the new model)."""
    old_model, new_model = tiny_model(), tiny_model(seed=1)
    update = build_weight_update(new_model.hf_state_dict(), version=7, dtype=torch.float32)
    eng = EmbeddedEngine(
        copy.deepcopy(old_model),
        max_running=4,
        context_len=64,
        eos_token_ids=[],
        partial_rollout=partial,
    )
    (late,) = eng.make_sequences(GenerateRequest(LATE_PROMPT, greedy(6), "late"))
    queued, applied_seen = [], []

    def after_each_token(seq) -> None:  # engine thread, between two steps
        if len(seq.output_ids) == 8 and not queued:
            queued.append(eng.submit_update(update))
            eng.submit([late])  # queued behind the update: held in non-partial mode
        elif queued:
            applied_seen.append(queued[0].done())

    async def scenario():
        (first,) = eng.make_sequences(GenerateRequest(PROMPT, greedy(24), "first"))
        first.on_update = after_each_token
        eng.submit([first])
        (first,) = await eng.wait([first])
        (done_late,) = await eng.wait([late])
        return first, done_late

    try:
        first, done_late = asyncio.run(scenario())
        queued[0].result(timeout=60)
    finally:
        eng.shutdown()
    return first, done_late, applied_seen, (old_model, new_model)


def test_partial_rollout_continues_under_the_new_version_with_both_tags_in_order():
    first, late, applied_seen, (old_model, new_model) = run_update_mid_generation(partial=True)
    assert first.versions == [0] * 8 + [7] * 16
    assert first.output_ids[:8] == greedy_reference(old_model, PROMPT, 8)
    assert all(applied_seen)  # applied before the very next decode step
    assert late.versions == [7] * 6
    assert late.output_ids == greedy_reference(new_model, LATE_PROMPT, 6)


def test_non_partial_update_waits_for_the_running_sequence_and_holds_new_ones():
    first, late, applied_seen, (old_model, new_model) = run_update_mid_generation(partial=False)
    # the whole first sequence is the old model's; the update waited for it to finish
    assert first.versions == [0] * 24
    assert first.output_ids == greedy_reference(old_model, PROMPT, 24)
    assert len(applied_seen) >= 15 and not any(applied_seen)  # tokens 9..23 at least
    # the request queued behind the update was not admitted before it: all new weights
    assert late.versions == [7] * 6
    assert late.output_ids == greedy_reference(new_model, LATE_PROMPT, 6)


def test_non_partial_update_applies_at_once_when_nothing_runs():
    model = tiny_model()
    eng = EmbeddedEngine(model, max_running=2, context_len=32, partial_rollout=False)
    try:
        update = build_weight_update(model.hf_state_dict(), version=3, dtype=torch.float32)
        eng.submit_update(update).result(timeout=60)
        assert eng.stats()["weight_version"] == 3
        assert eng.stats()["pending_weight_updates"] == 0
    finally:
        eng.shutdown()


def episode(versions: list[int], prompt_len: int = 3) -> Episode:
    n = len(versions)
    return Episode(
        prompt_ids=np.arange(prompt_len, dtype=np.int32),
        response_ids=np.arange(n, dtype=np.int32),
        loss_mask=np.ones(n, dtype=np.int8),
        rollout_logprobs=np.zeros(n, dtype=np.float32),
        versions=np.asarray(versions, dtype=np.int32),
    )


def _trainer_mask(e: Episode, version: int, staleness: int) -> np.ndarray:
    """The trainer's loss mask on the episode's response (trainer/step_arrays.py)."""
    return step_arrays([e], version, staleness, False).loss_mask[len(e.prompt_ids) :]


def test_staleness_of_a_two_version_group_is_its_oldest_token_and_masking_agrees():
    spanning = episode([4, 4, 4, 5, 5])
    group = EpisodeGroup(prompt_id="p", episodes=[spanning, episode([5, 5])])
    # the buffer's rule: a group is as stale as its oldest generated token
    assert group.oldest_version == 4
    # taken at version 5 with max_staleness 1 (oldest 4 >= 5 - 1): masking keeps every token
    np.testing.assert_array_equal(_trainer_mask(spanning, 5, 1), np.ones(5, np.float32))
    # built at version 6 with max_staleness 1, the version-4 tokens alone would be masked
    np.testing.assert_array_equal(_trainer_mask(spanning, 6, 1), [0, 0, 0, 1, 1])
    assert spans_versions(spanning) and not spans_versions(episode([5, 5]))
