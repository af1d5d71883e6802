"""What the engine no longer does per token, and that it still sees every weight change:
the decode-weight key is checked after a command that may touch the weights or an idle wait,
not before every forward; a caller awaiting n sequences is woken once (latch.all_done); a
request with return_text False is not detokenised; shared prefills' K/V copies are batched."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest
import torch

from models.decode import DecodeWeights
from rollout.embedded import EmbeddedEngine
from rollout.embedded.latch import all_done
from rollout.embedded.prompt_share import copy_slots
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import greedy_reference, tiny_model

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4], [7, 9]]
N = 20


def generate(eng: EmbeddedEngine) -> list[list[int]]:
    requests = [
        GenerateRequest(p, SamplingParams(max_new_tokens=N, temperature=0.0), f"r{i}")
        for i, p in enumerate(PROMPTS)
    ]
    return [o.output_ids for o in asyncio.run(eng.generate(requests))]


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():  # in place: the same tensors, new values (their versions move)
        for d, s in zip(dst.parameters(), src.parameters(), strict=True):
            d.copy_(s)


@pytest.fixture
def key_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = []
    key_of = DecodeWeights.key_of

    def counted(model: torch.nn.Module) -> tuple:
        calls.append(1)
        return key_of(model)

    monkeypatch.setattr(DecodeWeights, "key_of", staticmethod(counted))
    return calls


def test_weights_are_checked_per_command_not_per_forward_and_changes_are_seen(key_checks):
    model, other = tiny_model(), tiny_model(seed=1)
    eng = EmbeddedEngine(model, max_running=4, context_len=64, eos_token_ids=[])
    try:
        assert generate(eng) == [greedy_reference(model, p, N) for p in PROMPTS]
        # ~N forwards; the key was checked once after the idle wait (the submit touches none)
        assert 1 <= len(key_checks) <= 2
        copy_weights(model, other)  # while the engine is idle, outside any command
        assert generate(eng) == [greedy_reference(other, p, N) for p in PROMPTS]
        restored = tiny_model()
        eng.call(lambda: copy_weights(model, restored)).result(timeout=60)  # by a command
        assert generate(eng) == [greedy_reference(restored, p, N) for p in PROMPTS]
        assert len(key_checks) <= 8
    finally:
        eng.shutdown()


def test_all_done_resolves_with_the_last_future_and_tolerates_a_cancelled_waiter():
    futures: list[Future[int]] = [Future() for _ in range(3)]
    latch = all_done(futures)
    futures[0].set_result(0)
    futures[2].set_exception(ValueError("boom"))
    assert not latch.done()
    futures[1].set_result(1)
    assert latch.done() and latch.result() is None

    assert all_done([]).done()

    pending: list[Future[int]] = [Future(), Future()]
    waiter = all_done(pending)
    assert waiter.cancel()  # the awaiting task was cancelled
    for fut in pending:
        fut.set_result(0)  # completing them afterwards raises nothing
    assert waiter.cancelled()


def test_wait_raises_a_sequence_error_and_returns_sequences_in_order():
    model = tiny_model()
    eng = EmbeddedEngine(model, max_running=4, context_len=64, eos_token_ids=[])
    try:
        seqs = [
            s
            for i, p in enumerate(PROMPTS)
            for s in eng.make_sequences(
                GenerateRequest(p, SamplingParams(max_new_tokens=4, temperature=0.0), f"w{i}")
            )
        ]
        eng.submit(seqs)
        done = asyncio.run(eng.wait(seqs))
        assert [s.rid for s in done] == ["w0", "w1"]
        failing = eng.make_sequences(GenerateRequest(PROMPTS[0], SamplingParams(4), "f"))
        failing[0].done.set_exception(RuntimeError("forward failed"))
        with pytest.raises(RuntimeError, match="forward failed"):
            asyncio.run(eng.wait(failing))
    finally:
        eng.shutdown()


class CountingTokenizer:
    """Just enough of a tokenizer for the engine's output text: counts its decodes."""

    def __init__(self) -> None:
        self.decodes = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decodes += 1
        return " ".join(map(str, ids))


def test_return_text_false_skips_the_engines_detokenisation():
    tok = CountingTokenizer()
    eng = EmbeddedEngine(tiny_model(), tokenizer=tok, eos_token_ids=[], max_running=8, seed=0)
    try:

        def request(i: int, text: bool) -> GenerateRequest:
            params = SamplingParams(max_new_tokens=3, temperature=0.0)
            return GenerateRequest([1, 2, 3], params, f"r{i}", return_text=text)

        with_text = asyncio.run(eng.generate([request(0, True), request(1, True)]))
        assert tok.decodes == 2
        assert all(o.text == " ".join(map(str, o.output_ids)) for o in with_text)
        without = asyncio.run(eng.generate([request(2, False), request(3, False)]))
        assert tok.decodes == 2  # no decode for these two
        assert all(o.text is None for o in without)
        assert [o.output_ids for o in without] == [o.output_ids for o in with_text]
    finally:
        eng.shutdown()


def test_shared_prefill_copies_every_pair_in_one_indexed_copy_per_tensor():
    """copy_slots: each destination slot gets its source's first `length` positions in
    every cache tensor; other slots are untouched."""
    eng = EmbeddedEngine(tiny_model(), eos_token_ids=[], max_running=6, context_len=16, seed=0)
    try:
        sched = eng.sched
        layers = sched.slots.cache.layers
        gen = torch.Generator().manual_seed(0)
        for t in layers:
            t.copy_(torch.randn(t.shape, generator=gen))
        before = [t.clone() for t in layers]
        copy_slots(sched.slots.cache, [0, 0, 3], [1, 2, 5], 7)
        for t, old in zip(layers, before, strict=True):
            for src, dst in ((0, 1), (0, 2), (3, 5)):
                assert torch.equal(t[dst, :, :7], old[src, :, :7])
                assert torch.equal(t[dst, :, 7:], old[dst, :, 7:])
            assert torch.equal(t[[0, 3, 4]], old[[0, 3, 4]])
    finally:
        eng.shutdown()
