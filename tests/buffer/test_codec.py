"""The group codec: exact round trips, and named EpisodeCodecErrors (never crashes) on bad bytes."""

from __future__ import annotations

import dataclasses
import inspect
import struct

import msgpack
import numpy as np
import pytest

from buffer import codec
from buffer.codec import (
    EpisodeCodecError,
    decode_group,
    encode_group,
    encode_group_versioned,
)
from buffer.codec_header import _COLUMNS, _PREFIX, _check_header, _fast_heads, _typed_header
from buffer.episode import Episode, EpisodeGroup, FinishReason
from tests.buffer.helpers import make_group


def _assert_same(a: EpisodeGroup, b: EpisodeGroup) -> None:
    assert a.prompt_id == b.prompt_id and a.metadata == b.metadata
    assert len(a.episodes) == len(b.episodes)
    for x, y in zip(a.episodes, b.episodes):
        for name in ("prompt_ids", "response_ids", "loss_mask", "rollout_logprobs", "versions"):
            xa, ya = getattr(x, name), getattr(y, name)
            assert xa.dtype == ya.dtype, name
            np.testing.assert_array_equal(xa, ya, err_msg=name)
        assert (x.reward, x.rewards, x.finish_reason, x.metadata) == (
            y.reward,
            y.rewards,
            y.finish_reason,
            y.metadata,
        )


def _multi_turn_group() -> EpisodeGroup:
    """Two episodes with different prompts, tool tokens (mask 0), mixed versions, metadata."""
    rng = np.random.default_rng(3)
    episodes = []
    for i, (p, r) in enumerate([(7, 12), (3, 0)]):
        mask = (np.arange(r) % 3 != 0).astype(np.uint8)
        episodes.append(
            Episode(
                prompt_ids=rng.integers(0, 50_000, p),
                response_ids=rng.integers(0, 50_000, r),
                loss_mask=mask,
                rollout_logprobs=np.where(mask, -rng.random(r), 0.0),
                versions=np.where(mask, 4 + (np.arange(r) > 5), -1),
                reward=0.25 * i - 1.0,
                rewards={"math": 1.0, "format": -0.5},
                finish_reason=FinishReason.LENGTH if i else FinishReason.STOP,
                metadata={"turns": 2, "tool_calls": [{"name": "calc"}], "t": np.float32(0.5)},
            )
        )
    return EpisodeGroup("row-17", episodes, {"task": "calc", "worker": "w0"})


def test_round_trip_is_exact_for_shared_and_distinct_prompts() -> None:
    shared = make_group("p1", n=4, response_len=33, version=2)
    decoded = decode_group(encode_group(shared))
    _assert_same(shared, decoded)
    assert decoded.oldest_version == 2
    # arrays decoded from one record are writable and do not alias across episodes
    decoded.episodes[1].prompt_ids[0] = -5
    assert decoded.episodes[0].prompt_ids[0] != -5

    assert encode_group_versioned(shared) == (encode_group(shared), 2)
    mixed = _multi_turn_group()
    assert encode_group_versioned(mixed)[1] == mixed.oldest_version == 4
    untrained = Episode(prompt_ids=[1], response_ids=[2, 3], loss_mask=[0, 0],
                        rollout_logprobs=[0, 0], versions=[-1, -1])  # fmt: skip
    assert encode_group_versioned(EpisodeGroup("u", [untrained]))[1] is None
    back = decode_group(encode_group(mixed))
    assert back.episodes[0].metadata["t"] == 0.5  # numpy scalar became a float
    mixed.episodes[0].metadata["t"] = 0.5
    _assert_same(mixed, back)
    assert back.oldest_version == 4


def test_record_is_compact_raw_bytes() -> None:
    group = make_group("p1", n=8, response_len=256)
    record = encode_group(group)
    array_bytes = 5 * 4 + 8 * 256 * (4 + 4 + 4 + 1)  # shared prompt once + 4 response fields
    assert array_bytes < len(record) < array_bytes + 1024  # header under 1 KiB


def _reheader(record: bytes, edit) -> bytes:
    """Re-pack the record with its header changed by `edit` (body unchanged)."""
    _, fmt, hlen = _PREFIX.unpack_from(record, 0)
    header = msgpack.unpackb(record[_PREFIX.size : _PREFIX.size + hlen])
    edit(header)
    head = msgpack.packb(header)
    return _PREFIX.pack(b"PHEG", fmt, len(head)) + head + record[_PREFIX.size + hlen :]


def _set(path: list, value):
    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(["R", 0], 9), "body: truncated"),
        (_set(["R", 0], 7), "body: has trailing bytes"),
        (_set(["reward", 1], float("nan")), "episodes[1].reward: must be finite"),
        (_set(["rewards", 0], {"m": float("inf")}), "rewards['m']: must be finite"),
        (_set(["finish_reason", 0], "exploded"), "finish_reason: unknown value"),
        (_set(["dtypes", "response_ids"], "<i8"), "header.dtypes"),
        (lambda h: [h[k].clear() for k in _COLUMNS], "header: empty group"),
        (_set(["prompt_id"], 5), "header.prompt_id: wrong type"),
        (_set(["P", 0], True), "episodes[0].P: wrong type"),
        (lambda h: h.pop("metadata"), "header.metadata: missing"),
        (lambda h: h["R"].pop(), "header.R: 1 entries for 2 episodes"),
        (_set(["rewards", 1], {"m": "high"}), r"episodes[1].rewards['m']: expected str -> number"),
        (_set(["episode_metadata", 1], [1]), "episodes[1].episode_metadata: wrong type list"),
        (_set(["P", 1], -3), "episodes[1].P: negative length -3"),
    ],
)
def test_bad_header_names_the_field(edit, message: str) -> None:
    record = _reheader(encode_group(make_group("p1", n=2, response_len=8)), edit)
    with pytest.raises(EpisodeCodecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_group(record)


def test_bad_array_values_in_the_body_are_caught() -> None:
    record = bytearray(encode_group(make_group("p1", n=2, response_len=8)))
    body = len(record) - 16 * (4 + 4 + 4 + 1) - 5 * 4  # start of the shared prompt
    logprobs_at = body + 5 * 4 + 16 * 4
    struct.pack_into("<f", record, logprobs_at + 4 * 3, float("nan"))
    with pytest.raises(EpisodeCodecError, match=r"episodes\[0\]: rollout_logprobs: contains NaN"):
        decode_group(bytes(record))
    record = bytearray(encode_group(make_group("p1", n=2, response_len=8)))
    record[-1] = 7  # last loss_mask byte of episode 1
    with pytest.raises(EpisodeCodecError, match=r"episodes\[1\]: loss_mask: values must be 0 or 1"):
        decode_group(bytes(record))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"", "shorter than the prefix"),
        (b"XXXX" + bytes(20), "bad magic"),
        (_PREFIX.pack(b"PHEG", 9, 0), "format 9"),
        (_PREFIX.pack(b"PHEG", 1, 1000) + b"\x80", "header: truncated"),
        (_PREFIX.pack(b"PHEG", 1, 2) + b"\xc1\xc1", "header: not valid msgpack"),
        (_PREFIX.pack(b"PHEG", 1, 1) + b"\x01", "header: expected a map"),
        ("not bytes", "expected bytes"),
    ],
)
def test_malformed_records(record, message: str) -> None:
    with pytest.raises(EpisodeCodecError, match=message):
        decode_group(record)


def test_every_truncation_and_random_corruption_gives_a_codec_error() -> None:
    record = encode_group(_multi_turn_group())
    for cut in range(len(record)):
        with pytest.raises(EpisodeCodecError):
            decode_group(record[:cut])
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        corrupt = bytearray(record)
        for pos in rng.integers(0, len(record), rng.integers(1, 4)):
            corrupt[pos] = int(rng.integers(0, 256))
        try:
            group = decode_group(bytes(corrupt))  # anything but EpisodeCodecError fails the test
        except EpisodeCodecError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        for episode in group.episodes:  # the vectorized checks let nothing invalid through
            _assert_valid(episode)
    assert outcomes["error"] > 0 and outcomes["ok"] > 0 and sum(outcomes.values()) == 400


def _assert_valid(episode: Episode) -> None:
    episode.validate()
    expected = {"prompt_ids": np.int32, "response_ids": np.int32, "loss_mask": np.uint8,
                "rollout_logprobs": np.float32, "versions": np.int32}  # fmt: skip
    for name, dtype in expected.items():
        array = getattr(episode, name)
        assert array.dtype == dtype and array.ndim == 1, name
    assert isinstance(episode.finish_reason, FinishReason)
    assert isinstance(episode.reward, float)


def test_the_codec_constructor_covers_every_episode_field() -> None:
    params = list(inspect.signature(Episode._from_checked).parameters)
    assert params == [f.name for f in dataclasses.fields(Episode)]


def test_unserialisable_metadata_is_a_codec_error_on_encode() -> None:
    group = make_group("p1")
    group.metadata["handle"] = object()
    with pytest.raises(EpisodeCodecError, match="group 'p1' metadata: not serialisable"):
        encode_group(group)


def test_the_body_is_the_documented_layout_and_round_trips_with_routing() -> None:
    """The record is prefix + header + the columns concatenated field by field (format 1),
    built here independently of the codec; distinct prompts, empty responses and routed
    experts included, and arrays of another dtype are stored as the Episode's dtypes."""
    rng = np.random.default_rng(5)
    episodes = []
    for i, (p, r) in enumerate([(4, 6), (3, 0), (5, 9)]):
        episode = Episode.from_generation(
            prompt_ids=rng.integers(0, 9000, p),
            response_ids=rng.integers(0, 9000, r),
            logprobs=-rng.random(r),
            versions=np.full(r, 7 - i),
            finish_reason="length",
            routed_experts=rng.integers(0, 200, (r, 2, 3)).astype(np.uint8) if i == 2 else None,
        )
        episodes.append(episode)
    group = EpisodeGroup("layout", episodes, {"k": [1, 2]})
    record, oldest = encode_group_versioned(group)  # the arrays' own buffers, joined
    native = episodes[0].response_ids
    episodes[0].response_ids = native.astype(np.int64)  # cast on encode
    assert encode_group_versioned(group) == (record, oldest)
    episodes[0].response_ids = np.repeat(native, 2)[::2]  # not contiguous: copied on encode
    episodes[2].routed_experts = np.asfortranarray(episodes[2].routed_experts)
    assert encode_group_versioned(group) == (record, oldest)
    _, fmt, hlen = _PREFIX.unpack_from(record, 0)
    assert fmt == 1 and oldest == 5
    fields = ("response_ids", "rollout_logprobs", "versions", "loss_mask")
    dtypes = (np.int32, np.float32, np.int32, np.uint8)
    parts = [np.concatenate([e.prompt_ids for e in episodes]).astype("<i4").tobytes()]
    for name, dtype in zip(fields, dtypes):
        column = np.concatenate([getattr(e, name) for e in episodes])
        parts.append(column.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    parts.append(episodes[2].routed_experts.tobytes())
    assert record[_PREFIX.size + hlen :] == b"".join(parts)
    back = decode_group(record)
    _assert_same(group, back)
    assert back.episodes[1].response_ids.size == 0
    assert [e.routed_experts is None for e in back.episodes] == [True, True, False]
    np.testing.assert_array_equal(back.episodes[2].routed_experts, episodes[2].routed_experts)
    assert back.episodes[2].routing_start == 5


def _header(record: bytes) -> dict:
    _, _, hlen = _PREFIX.unpack_from(record, 0)
    return msgpack.unpackb(record[_PREFIX.size : _PREFIX.size + hlen])


# header edits on which the fast and the typed paths must agree with the strict one
_HEADER_EDITS = [
    lambda h: None,
    _set(["reward", 0], 3),  # an int reward: strict accepts it, the fast path defers
    _set(["reward", 0], 1e308),
    _set(["reward", 1], 1e308),  # finite terms, an overflowing sum: strict decides
    _set(["rewards", 1], {"m": 2}),
    _set(["rewards", 0], {"m": float("nan")}),
    _set(["finish_reason", 1], "length"),
    _set(["finish_reason", 1], 5),
    _set(["finish_reason", 1], "exploded"),
    _set(["P", 0], True),
    _set(["R", 1], -1),
    _set(["episode_metadata", 0], [1]),
    _set(["shared_prompt"], 1),
    _set(["prompt_id"], b"p1"),
    lambda h: h.pop("dtypes"),
    lambda h: h["R"].append(3),
    lambda h: [h[k].clear() for k in _COLUMNS],
]


def _edited_header(edit) -> tuple[dict, object]:
    """A multi-turn group's header after `edit`, and what the strict check makes of it (None:
    refused)."""
    group = _multi_turn_group()
    group.episodes[0].metadata["t"] = 0.5
    header = _header(encode_group(group))
    edit(header)
    try:
        return header, _check_header(header)
    except EpisodeCodecError:
        return header, None


@pytest.mark.parametrize("edit", _HEADER_EDITS)
def test_the_fast_header_check_accepts_only_what_the_strict_one_accepts(edit) -> None:
    """read_header's msgpack path tries _fast_heads (whole-column checks) and falls back to
    _check_header, which names the bad field: the fast path must return the same columns,
    defer (None), or raise only where the strict check raises too."""
    header, strict = _edited_header(edit)
    try:
        fast = _fast_heads(header)
    except EpisodeCodecError:  # only for a header the strict check refuses as well
        assert strict is None
        return
    assert fast is None or fast == strict
    if strict is not None and all(type(v) is float for v in header["reward"]):
        assert abs(sum(header["reward"])) == float("inf") or fast == strict


@pytest.mark.parametrize(
    "edit",
    [
        *_HEADER_EDITS,
        _set(["P", 1], -3),
        _set(["metadata"], {1: "a"}),  # an int key: the typed path defers, strict accepts
        _set(["episode_metadata", 0], {"turns": {0: "calc"}}),  # int keys inside metadata
        _set(["routing"], None),
        _set(["routing"], [None, [3, 1, 2, 2, "|u1"]]),
        _set(["dtypes", "versions"], 4),
        lambda h: h.pop("reward"),
        lambda h: h.update(unknown=1),  # unknown keys are ignored by both
    ],
)
def test_the_typed_header_accepts_only_what_the_strict_one_accepts(edit) -> None:
    """read_header tries one typed msgspec decode and falls back to msgpack + _check_header:
    the typed path must give the same columns and group fields, or defer (None), or raise
    only where the strict check raises too."""
    header, strict = _edited_header(edit)
    try:
        typed = _typed_header(msgpack.packb(header, use_bin_type=True), 0)
    except EpisodeCodecError:
        assert strict is None
        return
    if typed is None:
        return
    assert typed.heads == strict
    assert typed.prompt_id == header["prompt_id"] and typed.metadata == header["metadata"]
    assert typed.shared_prompt is header["shared_prompt"]
    assert typed.routing == header.get("routing")


def test_int_keys_in_metadata_round_trip() -> None:
    """msgpack writes int map keys; both header paths read them back (the strict one used
    to refuse them as invalid msgpack, so such a group was quarantined)."""
    group = make_group("p1", n=2, response_len=4)
    group.episodes[1].metadata["turns"] = {0: "calc", 1: "answer"}
    group.metadata[3] = "three"  # a top-level int key: the strict path reads it
    back = decode_group(encode_group(group))
    assert back.episodes[1].metadata["turns"] == {0: "calc", 1: "answer"}
    assert back.metadata == group.metadata


def test_the_header_is_written_as_msgpack_writes_it() -> None:
    """The header is packed by msgspec (faster) where it can: the bytes must equal
    msgpack.packb's, so records stay identical to the format's reference writer; what
    msgspec refuses goes to msgpack."""
    group = _multi_turn_group()
    header = _header(encode_group(group))
    group.metadata.update(
        {"ids": (1, 2), "big": 2**63, "tag": b"\x00\x01", 7: np.int64(3), "u": "ü" * 40}
    )
    header["metadata"] = group.metadata
    assert codec._pack(header, "h") == msgpack.packb(
        header, default=codec._msgpack_default, use_bin_type=True
    )
    group.metadata["huge"] = 2**70  # msgspec and msgpack both refuse it: a named error
    with pytest.raises(EpisodeCodecError, match="not serialisable"):
        encode_group(group)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: the float32 sum overflows
def test_large_finite_logprobs_decode_and_non_finite_ones_do_not() -> None:
    """decode's finiteness check sums in float32: finite values whose sum overflows float32
    are still accepted, a NaN or inf in any episode is still refused (and named)."""
    group = make_group("big", n=2, response_len=4)
    group.episodes[1].rollout_logprobs[:] = -3e38  # four of these overflow a float32 sum
    decoded = decode_group(encode_group(group))
    assert np.array_equal(decoded.columns.rollout_logprobs[4:], np.full(4, -3e38, np.float32))
    for bad in (np.inf, -np.inf, np.nan):
        group.episodes[1].rollout_logprobs[2] = bad
        with pytest.raises(EpisodeCodecError, match=r"episodes\[1\]: rollout_logprobs"):
            decode_group(encode_group(group))
