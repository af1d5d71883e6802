"""DecodedGroup: what decode_group hands out before and after its episodes are built equals
the eagerly built group; the record is validated before anything is built."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from buffer.codec import EpisodeCodecError, decode_group, encode_group
from buffer.decoded_group import DecodedGroup
from buffer.episode import Episode, EpisodeGroup, FinishReason
from tests.buffer.helpers import make_group

_ARRAYS = ("prompt_ids", "response_ids", "loss_mask", "rollout_logprobs", "versions")


def _mixed_group() -> EpisodeGroup:
    """Distinct prompts, tool tokens (mask 0), two versions, an untrained episode."""
    rng = np.random.default_rng(7)
    episodes = []
    for i, (p, r) in enumerate([(6, 10), (4, 0), (3, 5)]):
        mask = (np.arange(r) % 4 != 1).astype(np.uint8) if i != 2 else np.zeros(r, np.uint8)
        episodes.append(
            Episode(
                prompt_ids=rng.integers(0, 9000, p),
                response_ids=rng.integers(0, 9000, r),
                loss_mask=mask,
                rollout_logprobs=np.where(mask, -rng.random(r), 0.0),
                versions=np.where(mask, 3 + (np.arange(r) > 4), -1),
                reward=1.5 - i,
                rewards={"math": float(i)},
                finish_reason=FinishReason.LENGTH if i == 1 else FinishReason.STOP,
                metadata={"turns": i},
            )
        )
    return EpisodeGroup("row-3", episodes, {"task": "t"})


def _assert_equal_episodes(a: list[Episode], b: list[Episode]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in _ARRAYS:
            assert getattr(x, name).dtype == getattr(y, name).dtype, name
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert (x.reward, x.rewards, x.finish_reason, x.metadata) == (
            y.reward,
            y.rewards,
            y.finish_reason,
            y.metadata,
        )
        assert x.routed_experts is y.routed_experts is None


@pytest.mark.parametrize(
    "group", [make_group("p1", n=4, response_len=9, version=2), _mixed_group()]
)
def test_group_fields_need_no_episodes_and_match_the_eager_group(group: EpisodeGroup) -> None:
    decoded = decode_group(encode_group(group))
    assert isinstance(decoded, DecodedGroup) and isinstance(decoded, EpisodeGroup)
    assert decoded.prompt_id == group.prompt_id and decoded.metadata == group.metadata
    assert decoded.oldest_version == group.oldest_version
    assert decoded.num_tokens == group.num_tokens
    np.testing.assert_array_equal(decoded.rewards, group.rewards)
    assert not decoded.built  # none of the above built the episodes
    _assert_equal_episodes(decoded.episodes, group.episodes)
    assert decoded.built and decoded.episodes is decoded.episodes  # built once
    assert decoded.oldest_version == group.oldest_version


def test_columns_are_the_episodes_concatenated_and_share_their_memory() -> None:
    group = _mixed_group()
    decoded = decode_group(encode_group(group))
    columns = decoded.columns
    assert not columns.shared_prompt
    assert columns.prompt_lens == [6, 4, 3] and columns.response_lens == [10, 0, 5]
    for name in _ARRAYS:
        expected = np.concatenate([getattr(e, name) for e in group.episodes])
        np.testing.assert_array_equal(getattr(columns, name), expected, err_msg=name)
    columns.response_ids[0] = -9  # writable, and the episodes are views of the columns
    assert decoded.episodes[0].response_ids[0] == -9
    shared = decode_group(encode_group(make_group("p", n=3, response_len=4)))
    assert shared.columns.shared_prompt and len(shared.columns.prompt_ids) == 5


def test_episodes_are_writable_and_do_not_alias_one_another() -> None:
    decoded = decode_group(encode_group(make_group("p", n=3, response_len=4)))
    decoded.episodes[1].prompt_ids[0] = -5
    assert decoded.episodes[0].prompt_ids[0] != -5 and decoded.episodes[2].prompt_ids[0] != -5
    decoded.episodes[0].loss_mask[:] = 0  # changed episodes: the group asks them
    decoded.episodes[1].loss_mask[:] = 0
    decoded.episodes[2].versions[:] = 11
    assert decoded.oldest_version == 11


def test_a_record_changed_after_decoding_does_not_change_the_group() -> None:
    record = bytearray(encode_group(make_group("p", n=2, response_len=6, version=1)))
    decoded = decode_group(record)
    record[-20:] = bytes(20)  # the body's tail: versions and loss_mask
    np.testing.assert_array_equal(decoded.episodes[1].versions, np.ones(6, np.int32))
    assert decoded.oldest_version == 1


def test_a_bad_body_is_refused_before_anything_is_built() -> None:
    group = make_group("p", n=2, response_len=5)
    group.episodes[1].rollout_logprobs[2] = np.nan  # Episode checks at construction only
    with pytest.raises(EpisodeCodecError, match=r"episodes\[1\]: rollout_logprobs"):
        decode_group(encode_group(group))


def test_assigned_episodes_replace_the_built_ones() -> None:
    decoded = decode_group(encode_group(make_group("p", n=2, response_len=3, version=4)))
    other = make_group("p", n=1, response_len=2, version=9)
    decoded.episodes = other.episodes
    assert decoded.built and decoded.oldest_version == 9 and decoded.num_tokens == 7
    # equal to a plain EpisodeGroup with the same fields, both ways (the dataclass __eq__
    # alone compares only objects of one class)
    assert decoded == other and other == decoded
    assert decoded != make_group("q", n=1, response_len=2, version=9)


def test_a_decoded_group_pickles_built_or_not() -> None:
    decoded = decode_group(encode_group(make_group("p", n=3, response_len=4, version=2)))
    for _ in range(2):  # not built, then built
        back = pickle.loads(pickle.dumps(decoded))
        assert isinstance(back, DecodedGroup) and back.built == decoded.built
        assert back.oldest_version == 2
        _assert_equal_episodes(back.episodes, decoded.episodes)
