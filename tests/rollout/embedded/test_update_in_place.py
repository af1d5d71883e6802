"""Weight updates into a running engine refresh its decode weights in place: one build for the
engine's life, and each update's greedy tokens (batch 1 and batched, a partial rollout across
an update included) are those of the source model."""

from __future__ import annotations

import asyncio

import torch

from models import build_weight_update
from models.decode_weights import DecodeWeights
from rollout.embedded import EmbeddedEngine
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import greedy_reference, tiny_model

torch.set_num_threads(1)
PROMPTS = [[3, 1, 4, 1, 5], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3]]


def test_updates_refresh_in_place_and_decode_with_the_new_weights(monkeypatch) -> None:
    builds = []
    build = DecodeWeights.build.__func__

    def counted(cls, model, key):
        builds.append(key)
        return build(cls, model, key)

    monkeypatch.setattr(DecodeWeights, "build", classmethod(counted))
    eng = EmbeddedEngine(tiny_model(seed=0), max_running=4, context_len=64, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    try:
        for version, seed, dtype in ((1, 11, torch.float32), (2, 12, torch.float32)):
            source = tiny_model(seed=seed)
            asyncio.run(
                eng.update_weights(
                    build_weight_update(source.hf_state_dict(), version, dtype=dtype)
                )
            )
            for prompts in (PROMPTS[:1], PROMPTS):
                outs = asyncio.run(eng.generate([GenerateRequest(p, params) for p in prompts]))
                assert [o.output_ids for o in outs] == [
                    greedy_reference(source, p, 6) for p in prompts
                ]
                assert all(o.versions == [version] * 6 for o in outs)
        assert len(builds) == 1
    finally:
        eng.shutdown()


def _partial_rollout(update) -> object:
    """A 20-token greedy generation with `update` queued after token 8 (engine thread,
    between two steps): tokens 9.. run on the new weights over the old tokens' K/V."""
    eng = EmbeddedEngine(tiny_model(seed=0), max_running=4, context_len=64, eos_token_ids=[])
    queued = []

    def after_each_token(seq) -> None:
        if len(seq.output_ids) == 8 and not queued:
            queued.append(eng.submit_update(update))

    async def scenario():
        params = SamplingParams(max_new_tokens=20, temperature=0.0)
        (seq,) = eng.make_sequences(GenerateRequest(PROMPTS[0], params, "first"))
        seq.on_update = after_each_token
        eng.submit([seq])
        return (await eng.wait([seq]))[0]

    try:
        out = asyncio.run(scenario())
        queued[0].result(timeout=60)
    finally:
        eng.shutdown()
    return out


def test_a_partial_rollout_continues_as_with_rebuilt_weights(monkeypatch) -> None:
    update = build_weight_update(tiny_model(seed=11).hf_state_dict(), 1, dtype=torch.float32)
    refreshed = _partial_rollout(update)
    monkeypatch.setattr(DecodeWeights, "refresh", lambda self, model, key=None: False)
    rebuilt = _partial_rollout(update)
    assert refreshed.versions == rebuilt.versions == [0] * 8 + [1] * 12
    assert refreshed.output_ids == rebuilt.output_ids
    assert refreshed.logprobs == rebuilt.logprobs
