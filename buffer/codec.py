"""Binary codec for EpisodeGroup: one compact record per group, validated on decode.

Record layout (all integers little-endian):

    magic   4 bytes  b"PHEG"
    format  u8       FORMAT_VERSION
    hlen    u32      length of the header in bytes
    header  msgpack  prompt_id, metadata, dtypes, shared_prompt, and per-episode columns
                     (lists of n): P, R, reward, rewards, finish_reason, episode_metadata
    body    bytes    the arrays, field by field, each field concatenated over episodes:
                     prompt_ids int32 [sum P] (stored once if every episode shares it),
                     response_ids int32 [sum R], rollout_logprobs float32 [sum R],
                     versions int32 [sum R], loss_mask uint8 [sum R], then, when the
                     header has a `routing` column, each episode's routed_experts
                     (uint8 or uint16 [N, n_moe, k], the ids' own dtype: 1 byte per
                     layer and expert slot up to 256 experts)

`routing` (optional, absent when no episode carries experts, so such records are unchanged):
one entry per episode, null or [routing_start, N, n_moe, k, dtype].

Decoding checks the magic, the format, the header's types, the dtypes, that the body has
exactly the bytes the header promises, and finally the Episode invariants (lengths match
the response, rewards and logprobs finite). Any failure raises EpisodeCodecError naming the
field; no other exception escapes `decode_group` for any input bytes.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import numpy as np

from buffer.codec_header import (
    _DTYPES,
    _PREFIX,
    _PROMPT_DTYPE,
    _RESPONSE_BYTES,
    _RESPONSE_FIELDS,
    _ROUTING_DTYPES,
    FORMAT_VERSION,
    MAGIC,
    EpisodeCodecError,
    _Heads,
    read_header,
)
from buffer.decoded_group import DecodedGroup, routed_views, views
from buffer.episode import Episode, EpisodeGroup


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not serialisable")


def _msgspec_hook(obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray):
        return _msgpack_default(obj)
    raise NotImplementedError(f"{type(obj).__name__} is not serialisable")


# msgspec writes the same msgpack bytes as msgpack.packb(use_bin_type=True) at a fraction of
# its cost (tests/buffer/test_codec.py checks the two agree)
_ENCODER = msgspec.msgpack.Encoder(enc_hook=_msgspec_hook)


def _pack(obj: Any, what: str) -> bytes:
    try:
        return _ENCODER.encode(obj)
    except (TypeError, ValueError, OverflowError, NotImplementedError, msgspec.EncodeError):
        pass  # anything msgspec refuses: msgpack decides, and names the problem
    try:
        return msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EpisodeCodecError(f"{what}: not serialisable ({exc})") from exc


def _shares_prompt(prompts: tuple[Any, ...]) -> bool:
    first = prompts[0]
    first_bytes = first.tobytes()
    for prompt in prompts[1:]:
        if prompt is not first and (len(prompt) != len(first) or prompt.tobytes() != first_bytes):
            return False
    return True


def encode_group(group: EpisodeGroup) -> bytes:
    """Serialise a group into one record (see the module docstring for the layout)."""
    return encode_group_versioned(group)[0]


# an episode's fields in the order encode reads them: one C-level call per episode, and
# zip(*) turns the rows into columns
_ROW = operator.attrgetter(
    "prompt_ids", "response_ids", "rollout_logprobs", "versions", "loss_mask",
    "reward", "rewards", "finish_reason", "metadata", "routed_experts",
)  # fmt: skip


def encode_group_versioned(
    group: EpisodeGroup, frame: Callable[[int], tuple[bytes, bytes]] | None = None
) -> tuple[bytes, int | None]:
    """The record, and the group's oldest version (as group.oldest_version, computed once
    over the record's columns rather than per episode).

    The record is one bytes.join of the prefix, the header and the episodes' arrays
    themselves (their buffers, no per-field copies), when every array already has its wire
    dtype and is contiguous, as Episode's constructor leaves them; otherwise the columns
    are cast and concatenated first. frame: record size -> (before, after), bytes joined
    around the record in that same copy (the store's prepacked SET command, buffer/resp.py);
    the first result is then before + record + after."""
    episodes = group.episodes
    n = len(episodes)
    prompts, ids, logprobs, versions, masks, reward, rewards, finish, meta, experts = zip(
        *map(_ROW, episodes)
    )
    shared = _shares_prompt(prompts)
    lengths = list(map(len, ids))
    header = {
        "prompt_id": str(group.prompt_id),
        "metadata": group.metadata,
        "dtypes": _DTYPES,
        "shared_prompt": shared,
        "P": list(map(len, prompts)),
        "R": lengths,
        "reward": list(reward),
        "rewards": [{str(k): float(v) for k, v in r.items()} if r else {} for r in rewards]
        if any(rewards)
        else [{}] * n,
        # a FinishReason is a str (StrEnum): msgpack writes its value
        "finish_reason": list(finish),
        "episode_metadata": list(meta),
    }
    routed = [r for r in experts if r is not None]
    if routed:
        header["routing"] = [_routing_entry(e) for e in episodes]
    head = _pack(header, f"group {group.prompt_id!r} metadata")
    if shared:
        prompts = prompts[:1]
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head))
    routing = [np.ascontiguousarray(r, r.dtype.newbyteorder("<")) for r in routed]
    columns = (prompts, ids, logprobs, versions, masks)
    r_total = sum(lengths)
    body_at = len(prefix) + len(head)  # where the body starts in the record
    p_bytes = sum(map(len, prompts)) * _PROMPT_DTYPE.itemsize
    size = body_at + p_bytes + r_total * _RESPONSE_BYTES + sum(r.nbytes for r in routing)
    before, after = (b"", b"") if frame is None else frame(size)
    blob = _join_native(columns, [before, prefix, head], routing, after)
    if blob is None:
        body = _body(prompts, columns[1:], r_total)
        blob = b"".join([before, prefix, head, body, *routing, after])
    if frame is not None and len(blob) != len(before) + size + len(after):
        # arrays whose lengths disagree with the header (decode will quarantine the
        # record): frame the record as it came out
        record = blob[len(before) : len(blob) - len(after)]
        before, after = frame(len(record))
        blob = b"".join([before, record, after])
    at = len(before) + body_at + p_bytes
    return blob, _oldest(blob, at + r_total * _VERSIONS_AT, r_total)


# bytes per response token before the versions column (response_ids, rollout_logprobs)
_VERSIONS_AT = _RESPONSE_FIELDS[0][1].itemsize + _RESPONSE_FIELDS[1][1].itemsize


def _oldest(blob: bytes, at: int, r_total: int) -> int | None:
    """The oldest version over generated tokens, from views of the versions column at `at`
    and the loss_mask column after it (no gather: a uint8 mask seen as bool)."""
    version_column = np.frombuffer(blob, _RESPONSE_FIELDS[2][1], r_total, at)
    generated = np.frombuffer(blob, np.bool_, r_total, at + version_column.nbytes)
    oldest = int(np.minimum.reduce(version_column, where=generated, initial=_NO_OLDEST))
    if oldest == _NO_OLDEST and not generated.any():
        return None
    return oldest


_NO_OLDEST = np.iinfo(_RESPONSE_FIELDS[2][1]).max  # the reduction's start: no token seen


# the wire dtypes as the native dtype objects Episode's arrays carry (None on a big-endian
# host: there every array goes through the cast)
_NATIVE = (
    tuple(np.dtype(dt.str[1:]) for dt in (_PROMPT_DTYPE, *(d for _, d in _RESPONSE_FIELDS)))
    if sys.byteorder == "little"
    else None
)


def _join_native(
    columns: tuple[tuple[Any, ...], ...],
    head: list[bytes],
    routing: list[np.ndarray],
    after: bytes = b"",
) -> bytes | None:
    """head + every column's arrays + routing + after in one join, or None if an array is not of
    its wire dtype or not contiguous (then the caller casts). The dtypes are compared as
    one tuple (identity first, at C speed) rather than array by array."""
    if _NATIVE is None:
        return None
    prompts, ids, logprobs, versions, masks = columns
    arrays = [*prompts, *ids, *logprobs, *versions, *masks]
    try:
        if tuple(map(_DTYPE, arrays)) != _expected_dtypes(len(prompts), len(ids)):
            return None
        return b"".join([*head, *arrays, *routing, after])
    except (AttributeError, TypeError):  # not an array, or a non-contiguous one
        return None


_DTYPE = operator.attrgetter("dtype")


@functools.cache
def _expected_dtypes(prompts: int, episodes: int) -> tuple[np.dtype, ...]:
    """The native wire dtype of each array _join_native joins, in order."""
    counts = (prompts, episodes, episodes, episodes, episodes)
    return tuple(dtype for dtype, k in zip(_NATIVE or (), counts) for _ in range(k))


def _body(
    prompts: tuple[Any, ...], fields: tuple[tuple[Any, ...], ...], r_total: int
) -> np.ndarray:
    """The body without routing, as uint8 [bytes], each field cast to its wire dtype."""
    p_total = sum(len(a) for a in prompts)
    at = p_total * _PROMPT_DTYPE.itemsize
    body = np.empty(at + r_total * _RESPONSE_BYTES, np.uint8)
    np.concatenate(prompts, out=body[:at].view(_PROMPT_DTYPE), casting="unsafe")
    for arrays, (_, dtype) in zip(fields, _RESPONSE_FIELDS):
        end = at + r_total * dtype.itemsize
        np.concatenate(arrays, out=body[at:end].view(dtype), casting="unsafe")
        at = end
    return body


def _routing_entry(e: Episode) -> list | None:
    r = e.routed_experts
    if r is None:
        return None
    return [e.routing_start, *r.shape, np.dtype(r.dtype).newbyteorder("<").str]


def _check_routing(column: list, n: int) -> list[tuple[int, tuple, np.dtype] | None]:
    """The checked `routing` column: (start, shape, dtype) or None per episode."""
    if len(column) != n:
        raise EpisodeCodecError(f"header.routing: {len(column)} entries for {n} episodes")
    out: list[tuple[int, tuple, np.dtype] | None] = []
    for i, entry in enumerate(column):
        if entry is None:
            out.append(None)
            continue
        ok = isinstance(entry, list) and len(entry) == 5 and entry[4] in _ROUTING_DTYPES
        ints = ok and all(type(v) is int and v >= 0 for v in entry[:4])
        if not ints:
            raise EpisodeCodecError(
                f"episodes[{i}].routing: expected [start, N, n_moe, k, uint8|uint16 dtype], "
                f"got {entry!r}"
            )
        out.append((entry[0], tuple(entry[1:4]), _ROUTING_DTYPES[entry[4]]))
    return out


def _check_columns(logprobs: np.ndarray, mask: np.ndarray, heads: _Heads) -> None:
    """Episode.validate's value rules, over the whole group's columns at once.

    One reduction per column on the good path: a float32 sum is finite only if every value
    is (NaN and inf propagate), so only a non-finite sum (a bad value, or large finite ones
    that overflow float32) needs the exact check; a uint8 mask is 0/1 exactly when its max
    is <= 1."""
    bad = {}
    if not math.isfinite(np.add.reduce(logprobs)) and not np.isfinite(logprobs).all():
        bad["rollout_logprobs"] = ("contains NaN or inf", ~np.isfinite(logprobs))
    if mask.size and np.maximum.reduce(mask) > 1:
        bad["loss_mask"] = ("values must be 0 or 1", mask > 1)
    for name, (message, where) in bad.items():
        ends = np.cumsum(heads.r)
        episode = int(np.searchsorted(ends, int(np.argmax(where)), side="right"))
        raise EpisodeCodecError(f"episodes[{episode}]: {name}: {message}")


def decode_group(data: bytes) -> DecodedGroup:
    """Parse and validate a record; raise EpisodeCodecError on anything malformed.

    Every field is checked here; the Episode objects are built when `episodes` is first
    read (buffer/decoded_group.py)."""
    header = read_header(data)
    heads, shared, offset = header.heads, header.shared_prompt, header.offset
    n = len(heads.p)
    p_total = heads.p[0] if shared else sum(heads.p)
    r_total = sum(heads.r)
    expected = p_total * _PROMPT_DTYPE.itemsize + r_total * _RESPONSE_BYTES
    routing = None if header.routing is None else _check_routing(header.routing, n)
    if routing is not None:
        expected += sum(math.prod(r[1]) * r[2].itemsize for r in routing if r is not None)
    size = len(data) - offset
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise EpisodeCodecError(f"body: {state}: {size} bytes, header promises {expected}")
    buf = bytearray(memoryview(data)[offset:])  # one copy, so the arrays are writable
    columns, pos = views(buf, heads, shared)
    _check_columns(columns.rollout_logprobs, columns.loss_mask, heads)
    experts = None
    if routing is not None:
        starts = [0 if r is None else r[0] for r in routing]
        experts = (routed_views(buf, pos, routing, heads), starts)
    # the Episode objects are built when first read (buffer/decoded_group.py)
    return DecodedGroup.of(header.prompt_id, header.metadata, columns, heads, experts)
