"""A decoded group: validated whole-group columns, Episode objects built on first access.

`decode_group` checks a record's arrays over the whole group at once (one reduction per
column). What is left after that is per-episode Python: n Episode objects of 5 array views
each, and n - 1 copies of a shared prompt (episodes must not alias one another). A reader
that needs only the group's fields (the store's take, staleness, metrics) never pays that;
`DecodedGroup.episodes` builds the list the first time it is read and keeps it, so the
trainer, which reads every episode, pays it once, in its own step.

The body is copied once at decode (so the arrays are writable and a record changed later
changes nothing) and `columns` are views of that copy; the episodes' arrays are views of the
columns. (Deferring that copy too was measured: it saves the take ~3-5 us per group but
costs the trainer, which reads every episode, more than it saves: the arrays' views are then
made twice.) A DecodedGroup is an EpisodeGroup: same fields, same values, equal to the
eagerly built group (tests/buffer/test_decoded_group.py).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from buffer.codec_header import _PROMPT_DTYPE, _RESPONSE_FIELDS, EpisodeCodecError, _Heads
from buffer.episode import Episode, EpisodeGroup

_NO_OLDEST = np.iinfo(np.int32).max  # the reduction's start: no generated token seen


class GroupColumns(NamedTuple):
    """A group's arrays, concatenated over its n episodes (views of one writable buffer).

    prompt_ids        int32   [sum P], or [P] once when shared_prompt
    response_ids      int32   [sum R]
    rollout_logprobs  float32 [sum R]
    versions          int32   [sum R]
    loss_mask         uint8   [sum R]
    prompt_lens       list[int] [n]  P of each episode (equal when shared_prompt)
    response_lens     list[int] [n]  R of each episode
    shared_prompt     bool           every episode has the same prompt, stored once
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    rollout_logprobs: np.ndarray
    versions: np.ndarray
    loss_mask: np.ndarray
    prompt_lens: list[int]
    response_lens: list[int]
    shared_prompt: bool


Routing = list[tuple[int, tuple, np.dtype] | None]  # per episode: (start, shape, dtype)


def views(buf: Any, heads: _Heads, shared_prompt: bool) -> tuple[GroupColumns, int]:
    """The columns as views of `buf` (the body's bytes), and where the routing starts."""
    p_total = heads.p[0] if shared_prompt else sum(heads.p)
    r_total = sum(heads.r)
    prompts = np.frombuffer(buf, _PROMPT_DTYPE, p_total, 0)
    pos = prompts.nbytes
    arrays = []  # response_ids, rollout_logprobs, versions, loss_mask: the wire order
    for _, dtype in _RESPONSE_FIELDS:
        arrays.append(np.frombuffer(buf, dtype, r_total, pos))
        pos += arrays[-1].nbytes
    ids, logprobs, versions, mask = arrays
    columns = GroupColumns(prompts, ids, logprobs, versions, mask, heads.p, heads.r,
                           shared_prompt)  # fmt: skip
    return columns, pos


def routed_views(buf: Any, pos: int, routing: Routing, heads: _Heads) -> list[np.ndarray | None]:
    """Each episode's routed_experts (views of `buf` from `pos`), checked against its length."""
    routed: list[np.ndarray | None] = []
    for i, entry in enumerate(routing):
        if entry is None:
            routed.append(None)
            continue
        start, shape, dtype = entry
        if start + shape[0] > heads.p[i] + heads.r[i]:
            raise EpisodeCodecError(
                f"episodes[{i}].routing: {shape[0]} rows from {start} run past "
                f"the episode's {heads.p[i] + heads.r[i]} tokens"
            )
        size = math.prod(shape)
        routed.append(np.frombuffer(buf, dtype, size, pos).reshape(shape))
        pos += size * dtype.itemsize
    return routed


class _BuiltOnFirstRead:
    """`episodes` of a DecodedGroup: built when first read, then an ordinary attribute (a
    non-data descriptor, so the instance's value wins once it is set)."""

    def __get__(self, group: DecodedGroup | None, owner: type | None = None) -> Any:
        if group is None:
            return self
        episodes = group._build_episodes()
        group.__dict__["episodes"] = episodes
        return episodes


class DecodedGroup(EpisodeGroup):
    """An EpisodeGroup decoded from a record, whose episodes are built on first access.

    Built only by `DecodedGroup.of` (the codec, after validating every field). Assigning
    `episodes` works as on any EpisodeGroup. `columns`: the group's arrays, concatenated
    over its episodes (writable; the episodes' arrays are views of them)."""

    episodes = _BuiltOnFirstRead()  # type: ignore[assignment]
    columns: GroupColumns
    _heads: _Heads
    _routed: list[np.ndarray | None] | None  # None: no episode carries experts
    _starts: list[int] | None

    @classmethod
    def of(
        cls,
        prompt_id: str,
        metadata: dict[str, Any],
        columns: GroupColumns,
        heads: _Heads,
        routing: tuple[list[np.ndarray | None], list[int]] | None = None,
    ) -> DecodedGroup:
        group = object.__new__(cls)
        group.prompt_id, group.metadata = prompt_id, metadata
        group.routed_experts, group.routing_start = None, 0
        group.columns, group._heads = columns, heads
        group._routed, group._starts = routing if routing is not None else (None, None)
        return group

    def _build_episodes(self) -> list[Episode]:
        c, h = self.columns, self._heads
        n = len(c.response_lens)
        if c.shared_prompt:  # episodes must not alias one another's arrays
            prompts = [c.prompt_ids, *(c.prompt_ids.copy() for _ in range(n - 1))]
        else:
            bounds = np.cumsum(c.prompt_lens).tolist()
            prompts = [c.prompt_ids[b - p : b] for p, b in zip(c.prompt_lens, bounds)]
        routed = [None] * n if self._routed is None else self._routed
        starts = [0] * n if self._starts is None else self._starts
        ids, logprobs, versions, mask = c.response_ids, c.rollout_logprobs, c.versions, c.loss_mask
        from_checked = Episode._from_checked
        episodes = []
        at = 0
        for prompt, r, reward, rewards, finish, meta, route, start in zip(
            prompts, c.response_lens, h.reward, h.rewards, h.finish_reason, h.metadata, routed,
            starts,
        ):  # fmt: skip
            end = at + r
            episodes.append(
                from_checked(prompt, ids[at:end], mask[at:end], logprobs[at:end],
                             versions[at:end], reward, rewards, finish, meta, route, start)
            )  # fmt: skip
            at = end
        return episodes

    @property
    def built(self) -> bool:
        """Whether `episodes` has been read (or assigned) yet."""
        return "episodes" in self.__dict__

    @property
    def oldest_version(self) -> int | None:
        if self.built:  # the episodes may have been changed since: ask them
            return super().oldest_version
        c = self.columns
        oldest = int(np.minimum.reduce(c.versions, where=c.loss_mask.view(np.bool_),
                                       initial=_NO_OLDEST))  # fmt: skip
        if oldest == _NO_OLDEST and not c.loss_mask.any():
            return None
        return oldest

    @property
    def rewards(self) -> np.ndarray:
        if self.built:
            return super().rewards
        return np.array(self._heads.reward, dtype=np.float32)

    @property
    def num_tokens(self) -> int:
        if self.built:
            return super().num_tokens
        return sum(self._heads.p) + sum(self._heads.r)

    def __eq__(self, other: object) -> bool:
        # the dataclass __eq__ compares only objects of the very same class
        if not isinstance(other, EpisodeGroup):
            return NotImplemented
        mine = (self.prompt_id, self.episodes, self.metadata, self.routed_experts)
        theirs = (other.prompt_id, other.episodes, other.metadata, other.routed_experts)
        return mine == theirs and self.routing_start == other.routing_start

    __hash__ = None  # type: ignore[assignment]  # as the dataclass (eq without frozen)
