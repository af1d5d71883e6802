"""Successive weight updates into a running engine (the second and later ones reuse the cached
HF slot map): each lands, and the engine decodes with the newest weights at its version."""

from __future__ import annotations

import asyncio

import torch

from models import build_weight_update
from rollout.embedded import EmbeddedEngine
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import greedy_reference, tiny_model

torch.set_num_threads(1)


def test_each_of_three_updates_is_decoded_at_its_version() -> None:
    eng = EmbeddedEngine(tiny_model(seed=0), max_running=4, context_len=64, eos_token_ids=[])
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    try:
        outputs = []
        for version, seed in ((1, 11), (2, 12), (3, 11)):  # seed 11 again: back to old values
            source = tiny_model(seed=seed)
            update = build_weight_update(source.hf_state_dict(), version, dtype=torch.float32)
            asyncio.run(eng.update_weights(update))
            out = asyncio.run(eng.generate([GenerateRequest(prompt, params)]))[0]
            assert out.versions == [version] * 8
            assert out.output_ids == greedy_reference(source, prompt, 8)
            outputs.append(out.output_ids)
        assert outputs[0] != outputs[1] and outputs[0] == outputs[2]
    finally:
        eng.shutdown()
