"""A decoded group: validated whole-group columns, Episode objects built on first access.

`decode_group` checks a record's arrays over the whole group at once (one reduction per
column). What is left after that is per-episode Python: n Episode objects of 5 array views
each, and n - 1 copies of a shared prompt (episodes must not alias one another). A reader
that needs only the group's fields (the store's take, staleness, metrics) never pays that;
`DecodedGroup.episodes` builds the list the first time it is read and keeps it, so the
trainer, which reads every episode, pays it once, in its own step.

The body is validated on read-only views of the record itself; the one copy that makes
the arrays writable is made when `columns` or `episodes` is first read (the episodes are
views of the columns). A DecodedGroup is an EpisodeGroup: same fields, same values, equal
to the eagerly built group (tests/buffer/test_decoded_group.py).
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


class _Body(NamedTuple):
    """Where a checked record's arrays are: the record, the body's offset, the checked
    header columns and routing entries (None when no episode carries experts)."""

    record: bytes
    offset: int
    heads: _Heads
    shared_prompt: bool
    routing: Routing | None


def views(buf: Any, body: _Body) -> tuple[GroupColumns, int]:
    """The columns as views of `buf` (the body's bytes), and where the routing starts."""
    heads = body.heads
    p_total = heads.p[0] if body.shared_prompt else sum(heads.p)
    r_total = sum(heads.r)
    prompts = np.frombuffer(buf, _PROMPT_DTYPE, p_total, 0)
    pos = prompts.nbytes
    arrays = []  # response_ids, rollout_logprobs, versions, loss_mask: the wire order
    for _, dtype in _RESPONSE_FIELDS:
        arrays.append(np.frombuffer(buf, dtype, r_total, pos))
        pos += arrays[-1].nbytes
    ids, logprobs, versions, mask = arrays
    columns = GroupColumns(prompts, ids, logprobs, versions, mask, heads.p, heads.r,
                           body.shared_prompt)  # fmt: skip
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
    """`columns` and `episodes` of a DecodedGroup: built when first read, then ordinary
    attributes (a non-data descriptor, so the instance's value wins once it is set)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, group: DecodedGroup | None, owner: type | None = None) -> Any:
        if group is None:
            return self
        value = group._build(self.name)
        group.__dict__[self.name] = value
        return value


class DecodedGroup(EpisodeGroup):
    """An EpisodeGroup decoded from a record, whose episodes are built on first access.

    Built only by `DecodedGroup.of` (the codec, after validating every field on `checked`,
    read-only views of the record). Assigning `episodes` works as on any EpisodeGroup.
    `columns`: the group's arrays (writable; the episodes' arrays are views of them)."""

    episodes = _BuiltOnFirstRead()  # type: ignore[assignment]
    columns = _BuiltOnFirstRead()
    _body: _Body
    _checked: GroupColumns
    _routed: list[np.ndarray | None]  # set with the columns, when the record has routing

    @classmethod
    def of(
        cls, prompt_id: str, metadata: dict[str, Any], body: _Body, checked: GroupColumns
    ) -> DecodedGroup:
        group = object.__new__(cls)
        group.prompt_id, group.metadata = prompt_id, metadata
        group.routed_experts, group.routing_start = None, 0
        group._body, group._checked = body, checked
        return group

    def _build(self, name: str) -> Any:
        if name == "columns":  # the one copy of the body, so the arrays are writable
            body = self._body
            buf = bytearray(memoryview(body.record)[body.offset :])
            columns, pos = views(buf, body)
            if body.routing is not None:  # the experts' views, after the columns
                self._routed = routed_views(buf, pos, body.routing, body.heads)
            return columns
        return self._build_episodes()

    def _build_episodes(self) -> list[Episode]:
        c, body = self.columns, self._body
        n = len(c.response_lens)
        if c.shared_prompt:  # episodes must not alias one another's arrays
            prompts = [c.prompt_ids, *(c.prompt_ids.copy() for _ in range(n - 1))]
        else:
            bounds = np.cumsum(c.prompt_lens).tolist()
            prompts = [c.prompt_ids[b - p : b] for p, b in zip(c.prompt_lens, bounds)]
        routed: list[np.ndarray | None] = [None] * n
        starts = [0] * n
        if body.routing is not None:
            routed = self._routed
            starts = [0 if r is None else r[0] for r in body.routing]
        ids, logprobs, versions, mask = c.response_ids, c.rollout_logprobs, c.versions, c.loss_mask
        h = body.heads
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
        c = self.__dict__.get("columns", self._checked)
        oldest = int(np.minimum.reduce(c.versions, where=c.loss_mask.view(np.bool_),
                                       initial=_NO_OLDEST))  # fmt: skip
        if oldest == _NO_OLDEST and not c.loss_mask.any():
            return None
        return oldest

    @property
    def rewards(self) -> np.ndarray:
        if self.built:
            return super().rewards
        return np.array(self._body.heads.reward, dtype=np.float32)

    @property
    def num_tokens(self) -> int:
        if self.built:
            return super().num_tokens
        return sum(self._body.heads.p) + sum(self._body.heads.r)

    def __eq__(self, other: object) -> bool:
        # the dataclass __eq__ compares only objects of the very same class
        if not isinstance(other, EpisodeGroup):
            return NotImplemented
        mine = (self.prompt_id, self.episodes, self.metadata, self.routed_experts)
        theirs = (other.prompt_id, other.episodes, other.metadata, other.routed_experts)
        return mine == theirs and self.routing_start == other.routing_start

    __hash__ = None  # type: ignore[assignment]  # as the dataclass (eq without frozen)
