"""Typed request and response of POST|PUT /generate (SGLang 0.5.23's GenerateReqInput and its
answer, sglang_api.md B.1), so /openapi.json describes the route.

FastAPI checks the types (a wrong type is a 422 naming the field, as SGLang's dataclass body
is); protocol.parse_generate then applies SGLang's rules (exactly one of text/input_ids, the
sampling_params contract, fields this engine refuses). Keys not declared here are kept and
reach parse_generate, which refuses those it does not implement.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt


class GenerateReqInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None  # no bools
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    def as_body(self) -> dict[str, Any]:
        """The JSON object as sent (declared fields that were set, then the extra keys)."""
        return {**self.model_dump(exclude_unset=True), **(self.model_extra or {})}


class WeightVersionSpan(BaseModel):
    version: str
    start: int
    end: int


class GenerateMetaInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    finish_reason: dict[str, Any] | None  # {"type": "stop"|"length"|"abort", ...}
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    weight_version: str
    weight_versions: list[WeightVersionSpan]
    num_retractions: int
    e2e_latency: float
    output_token_logprobs: list[list[Any]] | None = None  # [logprob, token_id, text|null]


class GenerateResponse(BaseModel):
    """One output; a batch or n > 1 answers a JSON list of these (one SSE event each when
    streamed, `index` set for batches)."""

    text: str | None = None
    output_ids: list[int]
    meta_info: GenerateMetaInfo
    index: int | None = None
