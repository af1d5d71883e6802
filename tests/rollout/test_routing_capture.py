"""R3 capture in the embedded engine: the experts each MoE layer used per token, compact, in
the Episode and the codec, and kept per token across a weight update and a retraction."""

from __future__ import annotations

import asyncio
import base64
import copy

import numpy as np
import pytest
import torch

from buffer.codec import decode_group, encode_group
from buffer.episode import Episode, EpisodeError, EpisodeGroup, routing_dtype
from models import build_weight_update
from rollout.embedded import EmbeddedEngine
from rollout.embedded.sequence import Sequence, StopRule
from rollout.single_turn import generate_group
from rollout.types import GenerateRequest, SamplingParams
from tests.rollout.engine_helpers import tiny_model

torch.set_num_threads(1)

PROMPT = [5, 17, 3, 88, 42, 7]
MARGIN = 1e-4  # router choices closer than this may flip between the cached and packed paths


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(coro):
    return asyncio.run(coro)


@torch.no_grad()
def packed_routing(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(experts int64 [T, n_moe, k], selection margin float [T, n_moe]) of the uncached packed
    forward: the margin is the k-th best biased score minus the (k+1)-th."""
    margins = []

    def hook(gate, inputs, output):
        choice = output[2] + gate.e_score_correction_bias
        top = choice.topk(gate.top_k + 1, dim=-1).values
        margins.append(top[:, -2] - top[:, -1])

    handles = [b.gate.register_forward_hook(hook) for b in model.moe_blocks()]
    try:
        out = model.forward_packed(torch.tensor(ids), torch.tensor([0, len(ids)]))
    finally:
        for h in handles:
            h.remove()
    from models import RoutingCapture

    capture = RoutingCapture()
    model.forward_packed(torch.tensor(ids), torch.tensor([0, len(ids)]), routing=capture)
    assert out.hidden.shape[0] == len(ids)
    experts = capture.routed_experts.permute(1, 0, 2).numpy()
    return experts, torch.stack(margins, dim=1).numpy()


def assert_same_routing(rows: np.ndarray, reference: np.ndarray, margin: np.ndarray) -> None:
    """Rows equal the reference wherever the router's choice is not a near-tie (and such
    near-ties are rare, so the check is not vacuous)."""
    clear = margin > MARGIN
    assert clear.mean() > 0.9
    same = (rows.astype(np.int64) == reference).all(axis=-1)
    assert same[clear].all(), np.argwhere(~same & clear)


def test_engine_records_response_experts_compactly(model):
    engine = EmbeddedEngine(copy.deepcopy(model), eos_token_ids=[], context_len=64, seed=0)
    try:
        req = GenerateRequest(
            PROMPT, SamplingParams(max_new_tokens=10, temperature=1.0, sampling_seed=3)
        )
        req.return_routed_experts = True
        (out,) = run(engine.generate([req]))
    finally:
        engine.shutdown()
    cfg = model.config
    n_moe, k, p = len(cfg.moe_layer_ids), cfg.num_experts_per_tok, len(PROMPT)
    # the response's positions except the last token, which no forward consumed
    assert out.routed_experts.dtype == np.uint8 == routing_dtype(cfg.n_routed_experts)
    assert out.routed_experts.shape == (10 - 1, n_moe, k) and out.routed_experts_start == p
    experts, margin = packed_routing(model, PROMPT + out.output_ids)
    assert_same_routing(out.routed_experts, experts[p:-1], margin[p:-1])
    assert (np.diff(out.routed_experts.astype(int), axis=-1) > 0).all()  # ascending per token


def test_prompt_routing_on_request_and_siblings_get_the_shared_prefill(model):
    engine = EmbeddedEngine(copy.deepcopy(model), eos_token_ids=[], context_len=64, seed=0)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, sampling_seed=11)
    try:
        episodes = run(
            generate_group(engine, PROMPT, sampling, 3, metadata={}, routed_experts_from=0)
        )
        plain = run(generate_group(engine, PROMPT, sampling, 1, metadata={}))
    finally:
        engine.shutdown()
    assert plain[0].routed_experts is None  # not asked: nothing recorded
    p = len(PROMPT)
    for e in episodes:
        assert e.routing_start == 0 and len(e.routed_experts) == p + 6 - 1
        assert np.array_equal(e.routed_experts[:p], episodes[0].routed_experts[:p])
        experts, margin = packed_routing(model, PROMPT + e.response_ids.tolist())
        assert_same_routing(e.routed_experts, experts[:-1], margin[:-1])


def test_codec_keeps_the_ids_at_one_byte_per_layer_and_slot(model):
    n_moe, k = len(model.config.moe_layer_ids), model.config.num_experts_per_tok
    rng = np.random.default_rng(0)

    def episode(routed: bool) -> Episode:
        r = 9
        ids = rng.integers(0, 4, size=(r - 1, n_moe, k)).astype(np.uint8) if routed else None
        return Episode.from_generation(
            PROMPT, np.arange(r), np.full(r, -0.5), np.zeros(r), "stop", routed_experts=ids
        )

    group = EpisodeGroup("g", [episode(True), episode(False), episode(True)])
    plain = EpisodeGroup("g", [episode(False) for _ in range(3)])
    record = encode_group(group)
    back = decode_group(record)
    for a, b in zip(group.episodes, back.episodes, strict=True):
        if a.routed_experts is None:
            assert b.routed_experts is None
        else:
            assert b.routing_start == a.routing_start == len(PROMPT)
            assert b.routed_experts.dtype == np.uint8
            assert np.array_equal(a.routed_experts, b.routed_experts)
    body = 2 * 8 * n_moe * k  # two routed episodes of 8 rows: n_moe * k bytes per token
    header = len(record) - len(encode_group(plain)) - body
    assert 0 < header < 64  # the routing column of the header, nothing per token
    wide = np.full((8, n_moe, k), 300, np.uint16)  # > 256 experts: two bytes an id
    ep = Episode.from_generation(PROMPT, np.arange(9), np.zeros(9), np.zeros(9), "stop")
    ep.routed_experts = wide
    assert np.array_equal(
        decode_group(encode_group(EpisodeGroup("w", [ep]))).episodes[0].routed_experts, wide
    )
    with pytest.raises(EpisodeError, match="routed_experts"):
        Episode.from_generation(
            PROMPT, np.arange(3), np.zeros(3), np.zeros(3), "stop",
            routed_experts=np.zeros((5, n_moe, k), np.uint8),
        )  # fmt: skip


def test_partial_rollout_keeps_each_tokens_routing_across_update_and_retraction(model):
    """A weight update after token 8, then a retraction: the re-prefill routes every earlier
    position again under the new weights, but the recorded rows stay those the tokens were
    sampled with; later rows follow the new weights."""
    new_model = tiny_model(seed=1)
    update = build_weight_update(new_model.hf_state_dict(), version=7, dtype=torch.float32)
    eng = EmbeddedEngine(copy.deepcopy(model), max_running=4, context_len=64, eos_token_ids=[])
    queued = []

    def after_each_token(seq):  # engine thread: update and retract right after token 8
        if len(seq.output_ids) == 8 and not queued:
            queued.append(eng.submit_update(update))
            eng.call(eng.sched.retract_all)

    async def scenario():
        req = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=16, temperature=0.0))
        req.return_routed_experts = True
        seqs = eng.make_sequences(req, on_update=after_each_token)
        eng.submit(seqs)
        return (await eng.wait(seqs))[0]

    try:
        seq = run(scenario())
    finally:
        eng.shutdown()
    out = seq.to_output()
    assert seq.num_retractions == 1 and out.versions == [0] * 8 + [7] * 8
    p, ids = len(PROMPT), PROMPT + out.output_ids
    rows = out.routed_experts
    assert rows.shape[0] == 16 - 1
    old, old_margin = packed_routing(model, ids)
    new, new_margin = packed_routing(new_model, ids)
    # positions p .. p+6 were consumed under version 0; p+7 on (re-prefill, decode) under 7
    assert_same_routing(rows[:7], old[p : p + 7], old_margin[p : p + 7])
    assert_same_routing(rows[7:], new[p + 7 : -1], new_margin[p + 7 : -1])
    assert not np.array_equal(old[p : p + 7], new[p : p + 7])  # the re-prefill differed


def test_record_routing_keeps_first_rows_and_refuses_gaps():
    params = SamplingParams(max_new_tokens=4)
    seq = Sequence("r", "r", [1, 2, 3], params, StopRule.build(params, frozenset(), None), 0)
    seq.routing_start = 2
    seq.record_routing(np.full((3, 1, 2), 1, np.uint8), 0)  # positions 0..2: keeps 2
    seq.record_routing(np.full((4, 1, 2), 9, np.uint8), 0)  # re-prefill: keeps only 3
    assert seq.routed()[:, 0, 0].tolist() == [1, 9]
    with pytest.raises(RuntimeError, match="lost"):
        seq.record_routing(np.zeros((1, 1, 2), np.uint8), 6)


def test_http_server_answers_in_sglangs_layout_and_the_client_maps_it_back(model):
    """The embedded engine's HTTP server sends SGLang's routed_experts (base64 int32 over all
    layers, dense ones 0); SGLangClient maps it to ours: the same rows as in-process."""
    from rollout.http_client import SGLangClient
    from rollout.routing_wire import RoutingLayout
    from rollout.server import ServerThread, make_state

    layout = RoutingLayout.of(model.config)
    assert layout.moe_layers == tuple(model.config.moe_layer_ids)  # a dense layer 0 here
    local = EmbeddedEngine(copy.deepcopy(model), eos_token_ids=[], context_len=64)
    served = EmbeddedEngine(copy.deepcopy(model), eos_token_ids=[], context_len=64)
    req = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=7, temperature=0.0))
    req.return_routed_experts = True

    async def over_http(url: str):
        async with SGLangClient(url, routing=layout) as client:
            (mapped,) = await client.generate([req])
            raw = await client.generate_raw(  # SGLang's default start: the whole sequence
                {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 7, "temperature": 0},
                 "return_routed_experts": True}
            )  # fmt: skip
        async with SGLangClient(url) as bare:
            with pytest.raises(ValueError, match="routing"):
                await bare.generate([req])
        return mapped, raw

    try:
        (direct,) = run(local.generate([req]))
        with ServerThread(make_state(served, "tiny", no_auth=True)) as server:
            mapped, raw = run(over_http(server.url))
    finally:
        local.shutdown()
        served.shutdown()
    assert mapped.output_ids == direct.output_ids
    assert mapped.routed_experts.dtype == np.uint8 and mapped.routed_experts_start == len(PROMPT)
    assert np.array_equal(mapped.routed_experts, direct.routed_experts)
    whole = layout.decode(raw["meta_info"]["routed_experts"])
    assert len(whole) == len(PROMPT) + 7 - 1
    assert np.array_equal(whole[len(PROMPT) :], direct.routed_experts)
    wire = np.frombuffer(base64.b64decode(raw["meta_info"]["routed_experts"]), np.int32)
    assert (wire.reshape(len(whole), layout.num_layers, -1)[:, 0] == 0).all()  # dense layer
    with pytest.raises(ValueError, match="multiple"):
        layout.decode(base64.b64encode(b"\0" * 12).decode())


class RoutingScript:
    """A scripted multi-turn policy (tests/rollout/test_multiturn.py's turns) whose outputs
    carry routed experts as an engine's would: rows from the asked start position to the
    sequence's second-to-last token, every row holding the turn's index (the engine
    re-prefills earlier positions in each turn, under what may be newer weights)."""

    def __init__(self, turns) -> None:
        self.turns, self.asked = list(turns), []

    async def generate(self, requests):
        from rollout.types import GenerateOutput

        (request,) = requests
        self.asked.append((request.return_routed_experts, request.routed_experts_start_len))
        turn, index = self.turns.pop(0), len(self.asked) - 1
        start = request.routed_experts_start_len or 0
        n = len(request.input_ids) + len(turn.ids) - 1 - start
        routed = np.full((n, 2, 2), index, np.uint8) if request.return_routed_experts else None
        return [
            GenerateOutput(
                rid="r",
                prompt_ids=list(request.input_ids),
                output_ids=list(turn.ids),
                logprobs=list(turn.logprobs),
                versions=list(turn.versions),
                finish_reason=turn.finish_reason,
                matched_stop=turn.ids[-1] if turn.finish_reason == "stop" else None,
                routed_experts=routed,
                routed_experts_start=start,
            )
        ]


def test_multi_turn_episode_keeps_each_positions_first_routing(tmp_path):
    from envs.calculator import CalculatorEnv
    from envs.tasks import make_rows, tokenizer_corpus
    from models import chat
    from models.tokenizer import build_toy_tokenizer
    from rollout.multiturn import run_episode
    from tests.rollout.test_multiturn import model_turn, tool_call_text

    tokenizer = build_toy_tokenizer(tmp_path, tokenizer_corpus(n_per_task=200, seed=0))
    row = make_rows("calculator", 1, seed=0)[0]
    call = model_turn(tokenizer, tool_call_text(row["metadata"]["expression"]),
                      "<|observation|>", version=3, seed=0)  # fmt: skip
    final = model_turn(tokenizer, f"\n{row['label']}", "<|endoftext|>", version=4, seed=1)
    sampling = SamplingParams(max_new_tokens=64, temperature=1.0)
    for mode in ("response", "all"):
        engine = RoutingScript([call, final])
        episode = asyncio.run(
            run_episode(engine, tokenizer, CalculatorEnv(), row, sampling, max_turns=4,
                        max_total_tokens=2048, routing=mode)
        )  # fmt: skip
        p = len(episode.prompt_ids)
        start = p if mode == "response" else 0
        assert engine.asked == [(True, start), (True, start)]
        observation = chat.observation_ids(tokenizer, [row["label"]])
        assert episode.response_ids.tolist() == call.ids + observation + final.ids
        rows = episode.routed_experts[:, 0, 0].tolist()
        assert episode.routing_start == start and len(rows) == episode.num_tokens - 1 - start
        # turn 0 consumed every position up to its second-to-last token; the rest (its last
        # token, the observation, turn 1) were first consumed by turn 1
        first = p + len(call.ids) - 1 - start
        assert rows == [0] * first + [1] * (len(rows) - first)
    plain = asyncio.run(
        run_episode(RoutingScript([call, final]), tokenizer, CalculatorEnv(), row, sampling,
                    max_turns=4, max_total_tokens=2048)
    )  # fmt: skip
    assert plain.routed_experts is None
