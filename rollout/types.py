"""The rollout engine contract: sampling parameters, requests, outputs and the Engine protocol.

Every engine (the embedded engine, a client of an SGLang server, a client of sglang-router)
implements `Engine`. Rollout functions (single-turn, multi-turn) code against this file only.

Logprob definition (the same as buffer/episode.py's docstring, which the trainer recomputes):
for a generated token `t` at position `i`, `logprobs[i] = log_softmax(logits_i / T)[t]`, where
`T` is the sampling temperature (T = 1 when sampling greedily, temperature == 0) and *no*
top-p / top-k / min-p renormalisation is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from models.weight_update import WeightUpdate

FINISH_REASONS = ("stop", "length", "abort")
PAUSE_MODES = ("abort", "retract", "in_place")

# SGLang 0.5.23 sampling_params keys that this contract does not model. They are accepted by
# `from_sglang` only at their neutral value (the one that changes nothing); any other value is
# an error naming the key, because silently ignoring it would change the sampling distribution.
_SGLANG_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
    "beam_width": None,
    "watermark": None,
    "choice": None,
}
# SGLang keys that only affect detokenised text or streaming cadence: accepted with any value.
_SGLANG_TEXT_ONLY = (
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "stream_interval",
)


class SamplingParamsError(ValueError):
    """A sampling_params dict or value that is invalid; the message names the key."""


@dataclass
class SamplingParams:
    """Per-request sampling parameters. Field names are SGLang's `sampling_params` names."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 => all
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)  # stop strings
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    sampling_seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first field with an invalid value."""
        for name in ("max_new_tokens", "top_k", "n", "sampling_seed", "temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool):  # an int subclass: `true` is not a count
                raise SamplingParamsError(f"{name}: expected a number, got the bool {value}")
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SamplingParamsError(f"{name}: expected a finite number, got {value!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise SamplingParamsError(
                f"max_new_tokens: expected an int >= 0, got {self.max_new_tokens!r}"
            )
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise SamplingParamsError(
                f"temperature: expected a number >= 0, got {self.temperature!r}"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise SamplingParamsError(
                f"top_k: expected -1 (all) or an int >= 1, got {self.top_k!r}"
            )
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p: expected a number in [0, 1], got {self.min_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise SamplingParamsError(f"n: expected an int >= 1, got {self.n!r}")
        if self.sampling_seed is not None and not isinstance(self.sampling_seed, int):
            raise SamplingParamsError(
                f"sampling_seed: expected an int or null, got {self.sampling_seed!r}"
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError(f"stop: expected non-empty strings, got {self.stop!r}")
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError(
                f"stop_token_ids: expected ints >= 0, got {self.stop_token_ids!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_sglang(self) -> dict[str, Any]:
        """The SGLang `sampling_params` dict (only keys SGLang 0.5.23 accepts)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "ignore_eos": self.ignore_eos,
            "n": self.n,
        }
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.sampling_seed is not None:
            out["sampling_seed"] = self.sampling_seed
        return out

    @classmethod
    def from_sglang(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Parse an SGLang `sampling_params` dict.

        Raises SamplingParamsError for an unknown key (message in SGLang's shape: "unknown
        field `KEY`, expected one of ..."), for an SGLang key this engine does not implement
        set to a non-neutral value, and for invalid values.
        """
        d = dict(d or {})
        own = tuple(f.name for f in fields(cls))
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in _SGLANG_NEUTRAL:
                if value is not None and value != _SGLANG_NEUTRAL[key]:
                    raise SamplingParamsError(
                        f"sampling_params.{key}: not supported by this engine "
                        f"(only {_SGLANG_NEUTRAL[key]!r} is accepted), got {value!r}"
                    )
            elif key not in _SGLANG_TEXT_ONLY:
                expected = ", ".join(f"`{k}`" for k in (*own, *_SGLANG_NEUTRAL, *_SGLANG_TEXT_ONLY))
                raise SamplingParamsError(f"unknown field `{key}`, expected one of {expected}")
        if "stop" in kwargs:
            stop = kwargs["stop"]
            kwargs["stop"] = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if "stop_token_ids" in kwargs:
            ids = kwargs["stop_token_ids"]
            kwargs["stop_token_ids"] = [] if ids is None else sorted(set(ids))
        if kwargs.get("top_k") is not None and kwargs["top_k"] >= 1 << 30:
            kwargs["top_k"] = -1  # SGLang's "all"
        for key in ("temperature", "top_p", "min_p"):
            if isinstance(kwargs.get(key), int) and not isinstance(kwargs[key], bool):
                kwargs[key] = float(kwargs[key])
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "sampling_seed"}
        return cls(**kwargs)


@dataclass
class GenerateRequest:
    """One prompt to complete. `sampling.n > 1` yields n outputs, one per sample."""

    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None
    return_logprob: bool = True
    return_routed_experts: bool = False
    """Record the experts each MoE layer used per token (R3; SGLang's name)."""
    routed_experts_start_len: int | None = None
    """First position whose experts are returned; None = the first response token."""
    top_logprobs_num: int = 0
    """> 0: also return the this-many most likely tokens and their logprobs at each generated
    position (SGLang's name; OpenAI's top_logprobs). Computed only for requests that ask."""
    return_text: bool = True
    """False: the caller decodes the tokens itself, so an engine may leave `text` None (the
    embedded engine then skips a detokenisation per sample; an HTTP engine returns it anyway)."""


@dataclass
class GenerateOutput:
    """One completed sample.

    output_ids  exactly the tokens generated, including the stop token if one matched
    logprobs    len == len(output_ids); log_softmax(logits / T) at the token (see module doc)
    versions    len == len(output_ids); the weight version that produced each output token
    finish_reason  "stop" | "length" | "abort"
    matched_stop   the stop token id (int) or stop string (str) that ended it, else None
    routed_experts uint8|uint16 numpy [N, n_moe, k] with return_routed_experts: the experts
                   of positions routed_experts_start .. +N-1 of prompt + output (the last
                   token, which no forward consumed, has none), ascending per token
    top_logprobs   with top_logprobs_num > 0: per generated token, the (token id, logprob)
                   of the most likely tokens, logprob descending, by the `logprobs` definition
    """

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    matched_stop: int | str | None = None
    text: str | None = None
    routed_experts: Any = None
    routed_experts_start: int = 0
    top_logprobs: list[list[tuple[int, float]]] | None = None


@runtime_checkable
class Engine(Protocol):
    """What every engine offers: the embedded engine, an SGLang server client, a router client.

    `generate` with `n > 1` returns the n samples of each request consecutively, in request
    order. Outputs of aborted requests have finish_reason "abort" and the partial tokens.
    """

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]: ...

    async def update_weights(self, update: WeightUpdate) -> None: ...

    async def pause(self, mode: str = "abort") -> None: ...  # "abort" | "retract" | "in_place"

    async def resume(self) -> None: ...

    async def abort(self, rids: list[str] | None = None) -> None: ...  # None => all

    async def flush_cache(self) -> None: ...

    async def health(self) -> bool: ...

    async def weight_version(self) -> int: ...
