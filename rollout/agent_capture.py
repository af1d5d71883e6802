"""Token-exact capture of an agent's OpenAI calls, and the Episode(s) they make.

An agent talks to the engine through /v1/chat/completions; each call's response (asked with
`return_token_ids: true` and `logprobs: true`) carries the prompt ids the server rendered, the
sampled ids, their logprobs and weight versions (`CapturedCall.from_chat_completion`).
`build_episodes` joins the calls of one episode: the first call's prompt is the Episode's
prompt; each call's sampled tokens enter the response with loss_mask 1 and the engine's
logprobs and versions; whatever the next call's prompt adds after them (tool results, user
turns, the next generation prompt) enters with loss_mask 0, logprob 0 and version -1.

A call whose prompt does not extend the previous prompt + completion token for token (the
chat template re-rendered history differently, the agent edited or dropped turns) is a
*prefix mismatch*; re-tokenised history is never trained on. The policy
(`agent.on_prefix_mismatch`):

  split  close the episode so far and start a new one at this call's prompt (several
         token-exact episodes per agent run)
  drop   train on none of this agent run
Either way the count is returned for the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from buffer.episode import Episode, FinishReason

PrefixPolicy = Literal["split", "drop"]
PREFIX_POLICIES: tuple[str, ...] = ("split", "drop")


@dataclass(frozen=True)
class CapturedCall:
    """One OpenAI call as the engine served it.

    prompt_ids  [P] the rendered prompt; output_ids [T] the sampled tokens (stop token
    included); logprobs [T] the engine's; versions [T] the weight version of each token.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        t = len(self.output_ids)
        if len(self.logprobs) != t or len(self.versions) != t:
            raise ValueError(
                f"CapturedCall: {t} output_ids but {len(self.logprobs)} logprobs and "
                f"{len(self.versions)} versions"
            )

    @classmethod
    def from_chat_completion(cls, body: Mapping[str, Any], choice: int = 0) -> CapturedCall:
        """From a /v1/chat/completions JSON answer asked with return_token_ids and logprobs."""
        if body.get("prompt_token_ids") is None:
            raise ValueError("prompt_token_ids: missing; send return_token_ids: true")
        c = body["choices"][choice]
        content = (c.get("logprobs") or {}).get("content")
        if c.get("token_ids") is None or content is None:
            raise ValueError("choices[].token_ids/logprobs: send return_token_ids and logprobs")
        return cls(
            prompt_ids=list(body["prompt_token_ids"]),
            output_ids=list(c["token_ids"]),
            logprobs=[float(e["logprob"]) for e in content],
            versions=list(c["weight_versions"]),
            finish_reason=c["finish_reason"],
        )


@dataclass
class _Building:
    prompt_ids: list[int]
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    calls: int = 0
    last_finish: str = "stop"

    def context(self) -> list[int]:
        return self.prompt_ids + self.response

    def inserted(self, ids: list[int]) -> None:
        self.response += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)

    def sampled(self, call: CapturedCall) -> None:
        self.response += call.output_ids
        self.mask += [1] * len(call.output_ids)
        self.logprobs += call.logprobs
        self.versions += call.versions
        self.calls += 1
        self.last_finish = call.finish_reason

    def episode(self, metadata: Mapping[str, Any]) -> Episode:
        reason = {"length": FinishReason.LENGTH, "abort": FinishReason.ABORT}.get(
            self.last_finish, FinishReason.STOP
        )
        return Episode(
            prompt_ids=self.prompt_ids,
            response_ids=self.response,
            loss_mask=self.mask,
            rollout_logprobs=self.logprobs,
            versions=self.versions,
            finish_reason=reason,
            metadata={**metadata, "calls": self.calls},
        )


@dataclass
class CaptureResult:
    episodes: list[Episode]  # [] when dropped or when there were no calls
    prefix_mismatches: int  # calls whose prompt did not extend the context so far


def build_episodes(
    calls: Sequence[CapturedCall],
    on_prefix_mismatch: PrefixPolicy = "split",
    metadata: Mapping[str, Any] | None = None,
) -> CaptureResult:
    """The Episode(s) of one agent run's calls, in call order (see the module doc)."""
    if on_prefix_mismatch not in PREFIX_POLICIES:
        raise ValueError(
            f"agent.on_prefix_mismatch: expected one of {PREFIX_POLICIES}, "
            f"got {on_prefix_mismatch!r}"
        )
    done: list[_Building] = []
    current: _Building | None = None
    mismatches = 0
    for call in calls:
        if current is not None:
            context = current.context()
            if call.prompt_ids[: len(context)] == context:
                current.inserted(call.prompt_ids[len(context) :])
            else:
                mismatches += 1
                if on_prefix_mismatch == "drop":
                    return CaptureResult([], mismatches)
                done.append(current)
                current = None
        if current is None:
            current = _Building(prompt_ids=list(call.prompt_ids))
        current.sampled(call)
    if current is not None:
        done.append(current)
    meta = dict(metadata or {})
    episodes = [
        b.episode({**meta, "segment": i, "segments": len(done)}) for i, b in enumerate(done)
    ]
    return CaptureResult(episodes, mismatches)
