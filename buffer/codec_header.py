"""The record's prefix and header: wire constants, reading the msgpack header, and checking
its fields (buffer/codec.py holds the layout's description, encoding and the body).

`read_header` parses a well-formed header (what the encoder writes) in one typed msgspec
decode, which checks the types in C; anything it refuses goes to the strict path
(msgpack, `_check_header`), which accepts what it can and otherwise names the first bad
field. Every failure is an EpisodeCodecError.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any, NamedTuple

import msgpack
import msgspec
import numpy as np

from buffer.episode import (
    LOGPROB_DTYPE,
    MASK_DTYPE,
    ROUTING_DTYPES,
    TOKEN_DTYPE,
    VERSION_DTYPE,
    EpisodeError,
    FinishReason,
)

MAGIC = b"PHEG"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, format, header length

# (field, little-endian dtype, length key in the per-episode header)
_RESPONSE_FIELDS: tuple[tuple[str, np.dtype], ...] = (
    ("response_ids", np.dtype(TOKEN_DTYPE).newbyteorder("<")),
    ("rollout_logprobs", np.dtype(LOGPROB_DTYPE).newbyteorder("<")),
    ("versions", np.dtype(VERSION_DTYPE).newbyteorder("<")),
    ("loss_mask", np.dtype(MASK_DTYPE).newbyteorder("<")),
)
_PROMPT_DTYPE = np.dtype(TOKEN_DTYPE).newbyteorder("<")
_DTYPES = {"prompt_ids": _PROMPT_DTYPE.str, **{name: dt.str for name, dt in _RESPONSE_FIELDS}}
_RESPONSE_BYTES = sum(dt.itemsize for _, dt in _RESPONSE_FIELDS)  # per response token
_ROUTING_DTYPES = {
    np.dtype(d).newbyteorder("<").str: np.dtype(d).newbyteorder("<") for d in ROUTING_DTYPES
}


class EpisodeCodecError(EpisodeError):
    """A record that cannot be encoded or decoded; the message says which field and why."""


def _header_end(data: bytes) -> int:
    """Check the prefix; the offset where the header ends and the body starts."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EpisodeCodecError(f"record: expected bytes, got {type(data).__name__}")
    if len(data) < _PREFIX.size:
        raise EpisodeCodecError(f"record: {len(data)} bytes is shorter than the prefix")
    magic, fmt, hlen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise EpisodeCodecError(f"record: bad magic {magic!r}, expected {MAGIC!r}")
    if fmt != FORMAT_VERSION:
        raise EpisodeCodecError(f"record: format {fmt} is not the supported {FORMAT_VERSION}")
    end = _PREFIX.size + hlen
    if end > len(data):
        raise EpisodeCodecError(f"header: truncated, needs {hlen} bytes, record has {len(data)}")
    return end


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The header as a dict (msgpack), and the body's offset: the strict path."""
    end = _header_end(data)
    try:
        # integer map keys (metadata such as {turn: ...}) are allowed, as msgspec's typed
        # path allows them: the encoder writes them, so a decoder must read them back
        header = msgpack.unpackb(
            memoryview(data)[_PREFIX.size : end], raw=False, strict_map_key=False
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise EpisodeCodecError(f"header: not valid msgpack ({exc})") from exc
    if not isinstance(header, dict):
        raise EpisodeCodecError(f"header: expected a map, got {type(header).__name__}")
    return header, end


def _field(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise EpisodeCodecError(f"{where}.{key}: missing")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise EpisodeCodecError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


# per-episode header columns: name -> the exact types msgpack decodes them to (so a bool
# is never taken for an int)
_COLUMNS: dict[str, frozenset[type]] = {
    "P": frozenset({int}),
    "R": frozenset({int}),
    "reward": frozenset({int, float}),
    "rewards": frozenset({dict}),
    "finish_reason": frozenset({str}),
    "episode_metadata": frozenset({dict}),
}


class _Heads(NamedTuple):
    """The checked per-episode columns of a header."""

    p: list[int]
    r: list[int]
    reward: list[float]
    rewards: list[dict[str, float]]
    finish_reason: list[FinishReason]
    metadata: list[dict[str, Any]]


def _check_rewards(i: int, rewards: dict) -> dict[str, float]:
    out = {}
    for key, value in rewards.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            raise EpisodeCodecError(f"episodes[{i}].rewards[{key!r}]: expected str -> number")
        if not math.isfinite(value):
            raise EpisodeCodecError(f"episodes[{i}]: rewards[{key!r}]: must be finite, got {value}")
        out[key] = float(value)
    return out


def _check_column(header: dict[str, Any], key: str, n: int | None) -> list:
    column = _field(header, key, list, "header")
    if n is not None and len(column) != n:
        raise EpisodeCodecError(f"header.{key}: {len(column)} entries for {n} episodes")
    types = _COLUMNS[key]
    if not types.issuperset(map(type, column)):
        i, value = next((i, v) for i, v in enumerate(column) if type(v) not in types)
        raise EpisodeCodecError(f"episodes[{i}].{key}: wrong type {type(value).__name__}")
    return column


_INTS, _FLOATS = frozenset({int}), frozenset({float})
_DICTS, _STRS = frozenset({dict}), frozenset({str})
_REASONS = FinishReason._value2member_map_


def _fast_heads(header: dict[str, Any]) -> _Heads | None:
    """The checked columns of a well-formed header (what the encoder writes), by whole-column
    checks: a few C-level calls per column instead of Python work per episode. None when
    anything is off; then _check_header decides, naming the first bad field. Accepts only
    what _check_header accepts (rewards all floats, no empty group, finite reward sum: a
    sum of floats is finite only if every term is)."""
    try:
        columns = [header[key] for key in _COLUMNS]
        ok = (
            type(header["prompt_id"]) is str
            and type(header["metadata"]) is dict
            and type(header["shared_prompt"]) is bool
            and header["dtypes"] == _DTYPES
        )
    except KeyError:
        return None
    p, r, reward, rewards, reasons, metadata = columns
    if not ok or any(type(column) is not list for column in columns):
        return None
    n = len(p)
    if not n or any(len(column) != n for column in columns):
        return None
    ok = (
        _INTS.issuperset(map(type, p))
        and _INTS.issuperset(map(type, r))
        and min(p) >= 0
        and min(r) >= 0
        and _FLOATS.issuperset(map(type, reward))
        and math.isfinite(sum(reward))
        and _DICTS.issuperset(map(type, rewards))
        and _DICTS.issuperset(map(type, metadata))
        and _STRS.issuperset(map(type, reasons))
    )
    if not ok:
        return None
    finish = list(map(_REASONS.get, reasons))
    if None in finish:
        return None
    if any(rewards):
        rewards = [_check_rewards(i, d) if d else d for i, d in enumerate(rewards)]
    return _Heads(p, r, reward, rewards, finish, metadata)


def _check_header(header: dict[str, Any]) -> _Heads:
    _field(header, "prompt_id", str, "header")
    _field(header, "metadata", dict, "header")
    _field(header, "shared_prompt", bool, "header")
    dtypes = _field(header, "dtypes", dict, "header")
    if dtypes != _DTYPES:
        raise EpisodeCodecError(f"header.dtypes: {dtypes} do not match the expected {_DTYPES}")
    columns: dict[str, list] = {}
    for key in _COLUMNS:
        columns[key] = _check_column(header, key, len(columns["P"]) if columns else None)
    if not columns["P"]:
        raise EpisodeCodecError("header: empty group (no episodes)")
    for key in ("P", "R"):
        if min(columns[key]) < 0:
            i = next(i for i, v in enumerate(columns[key]) if v < 0)
            raise EpisodeCodecError(f"episodes[{i}].{key}: negative length {columns[key][i]}")
    for i, reward in enumerate(columns["reward"]):
        if not math.isfinite(reward):
            raise EpisodeCodecError(f"episodes[{i}].reward: must be finite, got {reward}")
    reasons = [FinishReason._value2member_map_.get(v) for v in columns["finish_reason"]]
    if None in reasons:
        i = reasons.index(None)
        value = columns["finish_reason"][i]
        raise EpisodeCodecError(f"episodes[{i}].finish_reason: unknown value {value!r}")
    return _Heads(
        p=columns["P"],
        r=columns["R"],
        reward=[float(v) for v in columns["reward"]],
        rewards=[_check_rewards(i, d) if d else {} for i, d in enumerate(columns["rewards"])],
        finish_reason=reasons,
        metadata=columns["episode_metadata"],
    )


class Header(NamedTuple):
    """A checked header: the group's fields, the per-episode columns, the raw `routing`
    column (None when absent; codec._check_routing checks it) and the body's offset."""

    prompt_id: str
    metadata: dict[str, Any]
    shared_prompt: bool
    heads: _Heads
    routing: list | None
    offset: int


_Length = Annotated[int, msgspec.Meta(ge=0)]


class _Wire(msgspec.Struct, gc=False):
    """The header as the encoder writes it. msgspec checks these types in C (no bool for an
    int, lengths >= 0, known finish reasons, str -> float rewards; ints become floats as in
    _check_header); a header it refuses may still be valid (e.g. int keys in a metadata
    dict), so read_header then asks the strict path. gc=False: one per decoded record, never
    in a reference cycle (it holds only decoded data), so the cyclic GC need not track it."""

    prompt_id: str
    metadata: dict[str, Any]
    dtypes: dict[str, str]
    shared_prompt: bool
    P: Annotated[list[_Length], msgspec.Meta(min_length=1)]
    R: list[_Length]
    reward: list[float]
    rewards: list[dict[str, float]]
    finish_reason: list[FinishReason]
    episode_metadata: list[dict[str, Any]]
    routing: list | msgspec.UnsetType = msgspec.UNSET  # present only when experts are carried


_WIRE = msgspec.msgpack.Decoder(_Wire)


def _typed_header(raw: bytes | memoryview, offset: int) -> Header | None:
    """The checked header by one typed decode, or None when msgspec refuses it or a rule
    it does not know fails (column lengths, the dtypes, finiteness): the strict path then
    decides. Accepts only what _check_header accepts."""
    try:
        wire = _WIRE.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    p, reward, rewards = wire.P, wire.reward, wire.rewards
    n = len(p)
    columns = (wire.R, reward, rewards, wire.finish_reason, wire.episode_metadata)
    if any(len(column) != n for column in columns) or wire.dtypes != _DTYPES:
        return None
    if not math.isfinite(sum(reward)):  # a sum of floats is finite only if every term is
        return None
    if any(rewards):
        rewards = [_check_rewards(i, d) if d else d for i, d in enumerate(rewards)]
    heads = _Heads(p, wire.R, reward, rewards, wire.finish_reason, wire.episode_metadata)
    routing = None if wire.routing is msgspec.UNSET else wire.routing
    return Header(wire.prompt_id, wire.metadata, wire.shared_prompt, heads, routing, offset)


def read_header(data: bytes) -> Header:
    """The record's checked header: the typed decode, else the strict path (which raises
    EpisodeCodecError naming the first bad field)."""
    end = _header_end(data)
    typed = _typed_header(memoryview(data)[_PREFIX.size : end], end)
    if typed is not None:
        return typed
    header, end = _read_header(data)
    heads = _fast_heads(header) or _check_header(header)
    routing = _field(header, "routing", list, "header") if "routing" in header else None
    return Header(
        header["prompt_id"], header["metadata"], header["shared_prompt"], heads, routing, end
    )
