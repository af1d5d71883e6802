"""Binary codec for EpisodeGroup: one compact record per group, validated on decode.

Record layout (all integers little-endian):

    magic   4 bytes  b"PHEG"
    format  u8       FORMAT_VERSION
    hlen    u32      length of the header in bytes
    header  msgpack  prompt_id, metadata, dtypes, per-episode scalars and lengths
    body    bytes    the arrays, field by field, each field concatenated over episodes:
                     prompt_ids int32 [sum P] (stored once if every episode shares it),
                     response_ids int32 [sum R], rollout_logprobs float32 [sum R],
                     versions int32 [sum R], loss_mask uint8 [sum R]

Decoding checks the magic, the format, the header's types, the dtypes, that the body has
exactly the bytes the header promises, and finally the Episode invariants (lengths match
the response, rewards and logprobs finite). Any failure raises EpisodeCodecError naming the
field; no other exception escapes `decode_group` for any input bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from buffer.episode import (
    LOGPROB_DTYPE,
    MASK_DTYPE,
    TOKEN_DTYPE,
    VERSION_DTYPE,
    Episode,
    EpisodeError,
    EpisodeGroup,
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


class EpisodeCodecError(EpisodeError):
    """A record that cannot be encoded or decoded; the message says which field and why."""


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not serialisable")


def _pack(obj: Any, what: str) -> bytes:
    try:
        return msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EpisodeCodecError(f"{what}: not serialisable ({exc})") from exc


def encode_group(group: EpisodeGroup) -> bytes:
    """Serialise a group into one record (see the module docstring for the layout)."""
    episodes = group.episodes
    first_prompt = episodes[0].prompt_ids
    shared = all(
        e.prompt_ids is first_prompt or np.array_equal(e.prompt_ids, first_prompt)
        for e in episodes[1:]
    )
    header = {
        "prompt_id": str(group.prompt_id),
        "metadata": group.metadata,
        "dtypes": _DTYPES,
        "shared_prompt": shared,
        "episodes": [
            {
                "P": len(e.prompt_ids),
                "R": len(e.response_ids),
                "reward": e.reward,
                "rewards": {str(k): float(v) for k, v in e.rewards.items()},
                "finish_reason": e.finish_reason.value,
                "metadata": e.metadata,
            }
            for e in episodes
        ],
    }
    head = _pack(header, f"group {group.prompt_id!r} metadata")
    prompts = [first_prompt] if shared else [e.prompt_ids for e in episodes]
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head]
    parts.append(np.concatenate(prompts).astype(_PROMPT_DTYPE, copy=False).tobytes())
    for name, dtype in _RESPONSE_FIELDS:
        column = np.concatenate([getattr(e, name) for e in episodes])
        parts.append(column.astype(dtype, copy=False).tobytes())
    return b"".join(parts)


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
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
    try:
        header = msgpack.unpackb(bytes(data[_PREFIX.size : end]), raw=False)
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


@dataclass(frozen=True)
class _EpisodeHead:
    """The checked scalars of one episode's header entry."""

    p: int
    r: int
    reward: float
    rewards: dict[str, float]
    finish_reason: FinishReason
    metadata: dict[str, Any]


def _check_rewards(rewards: dict, where: str) -> dict[str, float]:
    out = {}
    for key, value in rewards.items():
        if not isinstance(key, str) or isinstance(value, bool):
            raise EpisodeCodecError(f"{where}.rewards[{key!r}]: expected str -> number")
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise EpisodeCodecError(f"{where}: rewards[{key!r}]: must be finite, got {value!r}")
        out[key] = float(value)
    return out


def _check_episode_header(i: int, eh: Any) -> _EpisodeHead:
    where = f"episodes[{i}]"
    if not isinstance(eh, dict):
        raise EpisodeCodecError(f"{where}: expected a map, got {type(eh).__name__}")
    p = _field(eh, "P", int, where)
    r = _field(eh, "R", int, where)
    if p < 0 or r < 0:
        raise EpisodeCodecError(f"{where}: negative length P={p} R={r}")
    reward = _field(eh, "reward", (int, float), where)
    if not math.isfinite(reward):
        raise EpisodeCodecError(f"{where}.reward: must be finite, got {reward}")
    rewards = _check_rewards(_field(eh, "rewards", dict, where), where)
    metadata = _field(eh, "metadata", dict, where)
    reason = FinishReason._value2member_map_.get(_field(eh, "finish_reason", str, where))
    if reason is None:
        raise EpisodeCodecError(f"{where}.finish_reason: unknown value {eh['finish_reason']!r}")
    return _EpisodeHead(p, r, float(reward), rewards, reason, metadata)


def _check_header(header: dict[str, Any]) -> list[_EpisodeHead]:
    _field(header, "prompt_id", str, "header")
    _field(header, "metadata", dict, "header")
    _field(header, "shared_prompt", bool, "header")
    dtypes = _field(header, "dtypes", dict, "header")
    if dtypes != _DTYPES:
        raise EpisodeCodecError(f"header.dtypes: {dtypes} do not match the expected {_DTYPES}")
    ehs = _field(header, "episodes", list, "header")
    if not ehs:
        raise EpisodeCodecError("header.episodes: empty group")
    return [_check_episode_header(i, eh) for i, eh in enumerate(ehs)]


def _check_columns(columns: dict[str, np.ndarray], heads: list[_EpisodeHead]) -> None:
    """Episode.validate's value rules, over the whole group's columns at once."""
    bad = {
        "rollout_logprobs": ("contains NaN or inf", ~np.isfinite(columns["rollout_logprobs"])),
        "loss_mask": ("values must be 0 or 1", columns["loss_mask"] > 1),
    }
    for name, (message, mask) in bad.items():
        if mask.any():
            ends = np.cumsum([h.r for h in heads])
            episode = int(np.searchsorted(ends, int(np.argmax(mask)), side="right"))
            raise EpisodeCodecError(f"episodes[{episode}]: {name}: {message}")


def decode_group(data: bytes) -> EpisodeGroup:
    """Parse and validate a record; raise EpisodeCodecError on anything malformed."""
    header, offset = _read_header(data)
    heads = _check_header(header)
    shared = header["shared_prompt"]
    p_total = heads[0].p if shared else sum(h.p for h in heads)
    r_total = sum(h.r for h in heads)
    expected = p_total * _PROMPT_DTYPE.itemsize
    expected += sum(r_total * dt.itemsize for _, dt in _RESPONSE_FIELDS)
    body = len(data) - offset
    if body != expected:
        state = "truncated" if body < expected else "has trailing bytes"
        raise EpisodeCodecError(f"body: {state}: {body} bytes, header promises {expected}")
    buf = bytearray(data[offset:])  # one copy, so the arrays are writable
    prompts = np.frombuffer(buf, _PROMPT_DTYPE, p_total, 0)
    pos = p_total * _PROMPT_DTYPE.itemsize
    columns = {}
    for name, dtype in _RESPONSE_FIELDS:
        columns[name] = np.frombuffer(buf, dtype, r_total, pos)
        pos += r_total * dtype.itemsize
    _check_columns(columns, heads)
    episodes = []
    p_at = r_at = 0
    for i, head in enumerate(heads):
        if shared:  # episodes must not alias one another's arrays
            prompt = prompts if i == 0 else prompts.copy()
        else:
            prompt = prompts[p_at : p_at + head.p]
            p_at += head.p
        end = r_at + head.r
        episodes.append(
            Episode._from_checked(
                prompt_ids=prompt,
                response_ids=columns["response_ids"][r_at:end],
                loss_mask=columns["loss_mask"][r_at:end],
                rollout_logprobs=columns["rollout_logprobs"][r_at:end],
                versions=columns["versions"][r_at:end],
                reward=head.reward,
                rewards=head.rewards,
                finish_reason=head.finish_reason,
                metadata=head.metadata,
            )
        )
        r_at = end
    return EpisodeGroup(header["prompt_id"], episodes, header["metadata"])
