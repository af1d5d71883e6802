"""Folding newcomers' prefill into the decode step (`fold_prefill_tokens`): one forward for
both, with the tokens of separate forwards (greedy: the uncached model's; sampled: the same
request alone), logprobs within float noise, shared prompts and routing capture included."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from rollout.embedded import EmbeddedEngine
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import greedy_reference, model_logprobs, tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def newcomers() -> list[GenerateRequest]:
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, n=3)  # one shared prefill row
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, sampling_seed=4)
    return [
        GenerateRequest([9, 8, 7, 6], greedy, "b"),
        GenerateRequest(
            [5, 5], sampled, "c", return_routed_experts=True, routed_experts_start_len=0
        ),
    ]


def run_with_newcomers_mid_decode(model, fold: int) -> tuple[list, dict]:
    """A long greedy request decodes; after its 2nd token (on the engine thread, so no race)
    the newcomers are submitted and join at the next step, while it still decodes."""
    eng = EmbeddedEngine(
        model, max_running=16, context_len=64, eos_token_ids=[], seed=0, fold_prefill_tokens=fold
    )
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    (first,) = eng.make_sequences(GenerateRequest([1, 2, 3, 4, 5, 6, 7], params, "a"))
    later = [s for r in newcomers() for s in eng.make_sequences(r)]

    def submit_later(seq) -> None:
        if len(seq.output_ids) == 2:
            eng.submit(later)

    first.on_update = submit_later

    async def scenario():
        eng.submit([first])
        await eng.wait([first])
        return await eng.wait(later)

    try:
        done = asyncio.run(scenario())
        return [first, *done], eng.stats()
    finally:
        eng.shutdown()


def test_folded_prefill_gives_the_tokens_of_separate_forwards(model):
    folded, stats = run_with_newcomers_mid_decode(model, fold=64)
    assert stats["num_folded_prefills"] == 1
    assert stats["num_prefill_forwards"] == 1  # the first request's own prefill only
    assert stats["num_prefill_rows"] == 3  # a, the shared row of b's 3 samples, c
    apart, stats = run_with_newcomers_mid_decode(model, fold=0)
    assert stats["num_folded_prefills"] == 0 and stats["num_prefill_forwards"] == 2
    for f, a in zip(folded, apart, strict=True):
        assert f.rid == a.rid and f.output_ids == a.output_ids
        np.testing.assert_allclose(f.logprobs, a.logprobs, rtol=0, atol=1e-5)
    for seq in folded[:4]:  # greedy: the uncached model's own continuation
        assert seq.output_ids == greedy_reference(model, seq.prompt_ids, len(seq.output_ids))
    for seq in folded:
        want = model_logprobs(model, seq.prompt_ids, seq.output_ids)
        assert (torch.tensor(seq.logprobs) - want).abs().max().item() < 1e-4
    # experts of the folded prompt's positions and after: those of its own prefill forward
    c_folded, c_apart = folded[-1].routed(), apart[-1].routed()
    assert c_folded.shape[0] == 2 + 10 - 1 and np.array_equal(c_folded, c_apart)


def test_fold_prefill_tokens_bounds_what_folds(model):
    _, stats = run_with_newcomers_mid_decode(model, fold=7)  # rows of 4 + 2 tokens fit
    assert stats["num_folded_prefills"] == 1
    _, stats = run_with_newcomers_mid_decode(model, fold=5)  # 6 tokens do not
    assert stats["num_folded_prefills"] == 0 and stats["num_prefill_forwards"] == 2
    with pytest.raises(ValueError, match="fold_prefill_tokens"):
        EmbeddedEngine(model, max_running=2, context_len=16, fold_prefill_tokens=-1)
