"""SGLang 0.5.23 `/generate` response JSON -> `GenerateOutput` (used by the HTTP client).

Maps `finish_reason` objects, `[logprob, token_id, text|null]` triples and `weight_versions`
spans into per-token int versions. SGLang versions are strings; ours are ints: "default" (a
server that never received an update) is version 0, any other must be an integer string.
`routed_experts` (R3) is mapped with rollout/routing_wire.py when the request asked for it.
"""

from __future__ import annotations

from typing import Any

from rollout.routing_wire import RoutingLayout
from rollout.types import GenerateOutput

DEFAULT_VERSION = "default"  # SGLang's weight_version before any update; maps to int 0


def version_to_int(version: str | int | None) -> int:
    """Map an SGLang weight_version string to our int version ("default" and None are 0)."""
    if version is None or version == DEFAULT_VERSION:
        return 0
    try:
        return int(version)
    except (TypeError, ValueError):
        raise ValueError(
            f"weight_version: expected an integer string or {DEFAULT_VERSION!r}, got {version!r}"
        ) from None


def expand_weight_versions(meta: dict[str, Any], num_tokens: int) -> list[int]:
    """Per-token int versions from meta_info's `weight_versions` spans [start, end).

    Falls back to `weight_version` for every token when the spans are absent.
    """
    spans = meta.get("weight_versions")
    if not spans:
        return [version_to_int(meta.get("weight_version"))] * num_tokens
    out = [version_to_int(meta.get("weight_version"))] * num_tokens
    for span in spans:
        v = version_to_int(span["version"])
        for i in range(max(0, span["start"]), min(num_tokens, span["end"])):
            out[i] = v
    return out


def parse_generate_item(
    item: dict[str, Any],
    prompt_ids: list[int],
    *,
    routing: RoutingLayout | None = None,
    routing_start: int | None = None,
) -> GenerateOutput:
    """One SGLang /generate response object -> GenerateOutput; with routing_start (the
    request asked for routed experts from there) its routed_experts, mapped by `routing`."""
    meta = item["meta_info"]
    output_ids = list(item.get("output_ids") or [])
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "abort")
    matched = finish.get("matched") if reason == "stop" else None
    triples = meta.get("output_token_logprobs") or []
    logprobs = [float(t[0]) for t in triples]
    if logprobs and len(logprobs) != len(output_ids):
        raise ValueError(
            f"output_token_logprobs: {len(logprobs)} entries for {len(output_ids)} output_ids"
        )
    routed = None
    if routing_start is not None and routing is not None:
        if "routed_experts" not in meta:
            raise ValueError("meta_info.routed_experts: asked for, but the server sent none")
        routed = routing.decode(meta["routed_experts"])
    return GenerateOutput(
        rid=str(meta.get("id")),
        prompt_ids=list(prompt_ids),
        output_ids=output_ids,
        logprobs=logprobs,
        versions=expand_weight_versions(meta, len(output_ids)),
        finish_reason=reason,
        matched_stop=matched,
        text=item.get("text"),
        routed_experts=routed,
        routed_experts_start=routing_start or 0,
    )
