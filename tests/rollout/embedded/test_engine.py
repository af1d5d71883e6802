"""The embedded engine against the plain model: greedy decode, logprobs, batching invariance,
abort, pause/resume in every mode, weight updates mid-generation, stops, FP8."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch

from models import build_weight_update
from rollout.embedded import EmbeddedEngine, EngineBusyError
from rollout.embedded.scheduler import ContextLengthError
from rollout.types import Engine, GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import (
    greedy_reference,
    model_logprobs,
    tiny_model,
    wait_until,
)

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4], [7, 9], [11, 5, 8, 13, 21, 34, 55, 3, 2], [40], [99, 98, 97, 96, 95, 94]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def engine(model):
    eng = EmbeddedEngine(model, max_running=16, context_len=128, eos_token_ids=[], seed=0)
    yield eng
    eng.shutdown()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def run(coro):
    return asyncio.run(coro)


def test_greedy_matches_uncached_step_by_step_decode(engine, model):
    assert isinstance(engine, Engine)  # the rollout contract (rollout/types.py)
    outs = run(engine.generate([GenerateRequest(p, greedy(12)) for p in PROMPTS]))
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids == greedy_reference(model, prompt, 12)
        assert out.finish_reason == "length" and out.prompt_ids == prompt
        assert out.versions == [0] * 12
    assert len({tuple(o.output_ids) for o in outs}) > 1  # the model is not degenerate


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_equal_model_token_logprobs(engine, model, temperature):
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=0.9, top_k=50)
    outs = run(engine.generate([GenerateRequest(p, params) for p in PROMPTS[:3]]))
    for prompt, out in zip(PROMPTS, outs):
        ref = model_logprobs(model, prompt, out.output_ids, temperature or 1.0)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_request_in_a_mixed_batch_equals_request_alone(model, temperature):
    target = GenerateRequest(
        [5, 17, 29, 3],
        SamplingParams(max_new_tokens=16, temperature=temperature, sampling_seed=1234),
    )
    eng = EmbeddedEngine(model, max_running=16, context_len=128, eos_token_ids=[])
    try:
        alone = run(eng.generate([copy.deepcopy(target)]))[0]
        others = [
            GenerateRequest(p, SamplingParams(max_new_tokens=5 + 3 * i, temperature=1.0, n=2))
            for i, p in enumerate(PROMPTS)
        ]
        batch = run(eng.generate([*others[:2], copy.deepcopy(target), *others[2:]]))
    finally:
        eng.shutdown()
    together = batch[4]  # two requests with n=2 come first
    assert together.prompt_ids == target.input_ids
    # Exact tokens across batch shapes (which round the logits differently, ~1e-6): safe only
    # without near-ties. Greedy: greedy_reference checks the margins. Sampled: the draws lie
    # >= 5e-4 (relative) from every CDF boundary, measured for this seed.
    if temperature == 0.0:
        assert alone.output_ids == greedy_reference(model, target.input_ids, 16)
    assert together.output_ids == alone.output_ids
    torch.testing.assert_close(
        torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
    )


def test_sampling_seed_reproduces_and_n_samples_differ(engine):
    req = GenerateRequest([3, 1, 4], SamplingParams(max_new_tokens=12, n=4, sampling_seed=99))
    first = run(engine.generate([req]))
    second = run(engine.generate([copy.deepcopy(req)]))
    assert [o.output_ids for o in first] == [o.output_ids for o in second]
    assert len({tuple(o.output_ids) for o in first}) > 1
    assert [o.rid for o in first] == [f"{req.rid or first[0].rid[:-2]}_{j}" for j in range(4)]


def test_siblings_share_one_prefill_and_decode_together(engine, model):
    before = engine.stats()["num_forwards"]
    outs = run(
        engine.generate(
            [GenerateRequest([2, 7, 1, 8], SamplingParams(max_new_tokens=5, temperature=0.0, n=4))]
        )
    )
    # one prefill row for the four samples (K/V copied to the sibling slots), then 4 decodes
    assert engine.stats()["num_forwards"] - before == 5
    assert all(o.output_ids == greedy_reference(model, [2, 7, 1, 8], 5) for o in outs)


def test_requests_with_one_prompt_share_one_prefill_row(engine, model):
    """A rollout sends n single-sample requests per prompt: each distinct prompt is
    prefilled once (its K/V copied to the other slots), with the tokens, logprobs and
    experts of separate prefills (each request alone)."""
    prompts = [[2, 7, 1, 8, 2, 8], [3, 1, 4, 1, 5]]

    def requests():
        return [
            GenerateRequest(
                prompt,
                SamplingParams(max_new_tokens=4, temperature=1.0, sampling_seed=10 * i + j),
                rid=f"p{i}-{j}",
                return_routed_experts=j != 1,  # one sample per prompt without capture
            )
            for i, prompt in enumerate(prompts)
            for j in range(3)
        ]

    before = engine.stats()["num_prefill_rows"]
    shared = run(engine.generate(requests()))
    # one row per (prompt, capture or not): the samples that capture share, the other alone
    assert engine.stats()["num_prefill_rows"] - before == 4
    for req, out in zip(requests(), shared, strict=True):
        before = engine.stats()["num_prefill_rows"]
        alone = run(engine.generate([req]))[0]
        assert engine.stats()["num_prefill_rows"] - before == 1
        assert out.output_ids == alone.output_ids
        torch.testing.assert_close(out.logprobs, alone.logprobs, rtol=0, atol=1e-5)
        if req.return_routed_experts:
            assert (out.routed_experts == alone.routed_experts).all()
        else:
            assert out.routed_experts is None and alone.routed_experts is None
        want = model_logprobs(model, req.input_ids, out.output_ids)
        assert (torch.tensor(out.logprobs) - want).abs().max().item() < 1e-4


def _slow(seq):
    """on_update hook: 5 ms per token on the engine thread, so a control call made after a
    few tokens always lands long before the sequence could finish (no race on a busy CPU)."""
    time.sleep(0.005)


def _start(engine, prompt, n_tokens, rid, slow=True):
    params = greedy(n_tokens, ignore_eos=True)
    seqs = engine.make_sequences(GenerateRequest(prompt, params, rid), _slow if slow else None)
    engine.submit(seqs)
    return seqs[0]


def test_abort_one_request_keeps_the_others(engine, model):
    async def scenario():
        victim = _start(engine, [1, 2, 3], 120, "victim")
        other = _start(engine, [4, 5, 6], 20, "other", slow=False)
        await wait_until(lambda: len(victim.output_ids) >= 3)
        await engine.abort(["victim"])
        return await engine.wait([victim, other])

    victim, other = run(scenario())
    assert victim.finish_reason == "abort" and 3 <= len(victim.output_ids) < 120
    assert victim.output_ids == greedy_reference(model, [1, 2, 3], len(victim.output_ids))
    assert other.finish_reason == "length"
    assert other.output_ids == greedy_reference(model, [4, 5, 6], 20)


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_keeps_requests_and_resume_finishes_them(engine, model, mode):
    async def scenario():
        seq = _start(engine, [8, 6, 4, 2], 60, "paused")
        await wait_until(lambda: len(seq.output_ids) >= 5)
        await engine.pause(mode)
        frozen = len(seq.output_ids)
        late = _start(engine, [3, 3], 5, "late", slow=False)  # queued while paused
        await asyncio.sleep(0.1)
        assert len(seq.output_ids) == frozen and not late.output_ids  # nothing ran
        if mode == "retract":
            await engine.flush_cache()  # allowed: no KV held while retracted
        else:
            with pytest.raises(EngineBusyError):
                await engine.flush_cache()
        await engine.resume()
        return await engine.wait([seq, late])

    seq, late = run(scenario())
    assert seq.finish_reason == "length"
    assert seq.output_ids == greedy_reference(model, [8, 6, 4, 2], 60)  # KV kept or recomputed
    assert seq.num_retractions == (1 if mode == "retract" else 0)
    assert late.output_ids == greedy_reference(model, [3, 3], 5)


def test_pause_abort_returns_partial_outputs_then_serves_new_requests(engine, model):
    async def scenario():
        seq = _start(engine, [9, 9, 9], 120, "inflight")
        await wait_until(lambda: len(seq.output_ids) >= 2)
        await engine.pause("abort")
        (aborted,) = await engine.wait([seq])
        late = _start(engine, [2, 4], 6, "after", slow=False)
        await engine.resume()
        return aborted, (await engine.wait([late]))[0]

    aborted, late = run(scenario())
    assert aborted.finish_reason == "abort" and 2 <= len(aborted.output_ids) < 120
    assert late.output_ids == greedy_reference(model, [2, 4], 6)


def test_weight_update_mid_generation_is_applied_and_versions_show_where(model):
    new_model = tiny_model(seed=1)
    update = build_weight_update(new_model.hf_state_dict(), version=7, dtype=torch.float32)
    local = copy.deepcopy(model)
    eng = EmbeddedEngine(local, max_running=4, context_len=128, eos_token_ids=[])
    queued = []

    def after_each_token(seq):  # engine thread: queue the update right after token 8
        if len(seq.output_ids) == 8 and not queued:
            queued.append(eng.submit_update(update))

    async def scenario():
        (seq,) = eng.make_sequences(GenerateRequest([1, 2, 3, 4], greedy(40), "partial"))
        seq.on_update = after_each_token
        eng.submit([seq])
        return (await eng.wait([seq]))[0]

    try:
        seq = run(scenario())
        queued[0].result(timeout=30)
        # the update landed between decode steps 8 and 9; the sequence went on with it
        assert seq.versions == [0] * 8 + [7] * 32
        assert seq.output_ids[:8] == greedy_reference(model, [1, 2, 3, 4], 8)
        # tokens after the switch come from the new weights over the old prefix's K/V: their
        # logprobs differ from the old model's (the new weights really were used)
        old = model_logprobs(model, [1, 2, 3, 4], seq.output_ids)
        assert float((torch.tensor(seq.logprobs[8:]) - old[8:]).abs().max()) > 0.1
        torch.testing.assert_close(torch.tensor(seq.logprobs[:8]), old[:8], atol=2e-5, rtol=0)
        assert run(eng.weight_version()) == 7
        for p_new, p_local in zip(new_model.parameters(), local.parameters()):
            torch.testing.assert_close(p_local, p_new)
        # requests after the update are exactly the new model's greedy outputs
        out = run(eng.generate([GenerateRequest([5, 6], greedy(10))]))[0]
        assert out.output_ids == greedy_reference(new_model, [5, 6], 10)
        assert out.versions == [7] * 10
    finally:
        eng.shutdown()


def test_stop_token_ids_and_ignore_eos(engine, model):
    ref = greedy_reference(model, [1, 2, 3, 4], 12)
    stop_id = ref[5]
    first = ref.index(stop_id)
    out = run(
        engine.generate([GenerateRequest([1, 2, 3, 4], greedy(12, stop_token_ids=[stop_id]))])
    )
    assert out[0].output_ids == ref[: first + 1]
    assert out[0].finish_reason == "stop" and out[0].matched_stop == stop_id
    ignored = greedy(12, stop_token_ids=[stop_id], ignore_eos=True)
    out = run(engine.generate([GenerateRequest([1, 2, 3, 4], ignored)]))
    assert out[0].output_ids == ref and out[0].finish_reason == "length"


def test_context_length_and_zero_tokens(engine):
    with pytest.raises(ContextLengthError, match="maximum context length of 128 tokens"):
        run(engine.generate([GenerateRequest(list(range(100)), greedy(29))]))
    out = run(engine.generate([GenerateRequest([1, 2], greedy(0))]))[0]
    assert out.output_ids == [] and out.finish_reason == "length"


def test_fp8_engine_runs_and_logprob_gap_is_bounded(model):
    fp8_model = copy.deepcopy(model)
    eng = EmbeddedEngine(fp8_model, max_running=8, context_len=64, eos_token_ids=[], fp8=True)
    try:
        outs = run(eng.generate([GenerateRequest(p, greedy(10)) for p in PROMPTS]))
    finally:
        eng.shutdown()
    from models.fp8 import is_fp8_model

    assert is_fp8_model(fp8_model)
    gaps = []
    for prompt, out in zip(PROMPTS, outs):
        # the engine's FP8 path equals the FP8 model's own (training-path) logprobs ...
        own = model_logprobs(fp8_model, prompt, out.output_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), own, atol=1e-4, rtol=0)
        # ... and stays close to the fp32 weights on the same tokens
        ref = model_logprobs(model, prompt, out.output_ids)
        gaps.append((torch.tensor(out.logprobs) - ref).abs())
    gap = torch.cat(gaps)
    # e4m3 keeps 3 mantissa bits (~3% weight error); measured here: mean 0.11, max 0.36 nats
    assert float(gap.mean()) < 0.25 and float(gap.max()) < 1.0
    assert float(gap.max()) > 1e-3  # FP8 really changed the numerics


def test_forward_counters_and_decode_batch_histogram(engine):
    """stats(): prefill + decode forwards = forwards; the decode rows are every token after
    each sequence's first (sampled from its prefill); the batch-size histogram counts each
    decode forward once, in the bucket of its size (2**(i-1) < size <= 2**i)."""
    before = engine.stats()
    lengths = [1, 3, 9, 17]  # sequences leave at different steps: batches 4, 3, 2, 1
    outs = run(
        engine.generate([GenerateRequest(PROMPTS[i], greedy(n)) for i, n in enumerate(lengths)])
    )
    after = engine.stats()
    diff = {k: after[k] - before.get(k, 0) for k in after if k.startswith(("num_", "decode_"))}
    assert diff["num_prefill_forwards"] + diff["num_decode_forwards"] == diff["num_forwards"]
    assert diff["num_decode_rows"] == sum(len(o.output_ids) - 1 for o in outs) == 26
    assert diff["num_decode_forwards"] == 16  # the longest sequence's tokens after its first
    # batch 3 for 2 steps (tokens 2-3), 2 for 6 (4-9), 1 for 8 (10-17)
    assert diff.get("decode_batch_le_4", 0) == 2
    assert diff.get("decode_batch_le_2", 0) == 6
    assert diff.get("decode_batch_le_1", 0) == 8
    assert after["time_decode_s"] > before["time_decode_s"]
