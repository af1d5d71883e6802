"""SGLang 0.5.23 `/generate` JSON <-> engine objects (reference/sglang_api.md section B.1).

Request: `text` or `input_ids` (single or batch), `sampling_params` (dict or one per prompt;
unknown keys are refused with SGLang's contract message), `rid` (str or list), `return_logprob`
(bool or list), `return_text_in_logprobs`, `stream`. Options this engine does not implement
(prompt logprobs, top logprobs, input_embeds, ...) are refused with a message naming the field
instead of being silently ignored.

Response items: `text`, `output_ids`, `meta_info` with `id`, `finish_reason` as SGLang's
objects, `prompt_tokens`, `completion_tokens`, `cached_tokens`, `weight_version`,
`weight_versions` spans, `num_retractions`, `e2e_latency` and, with return_logprob,
`output_token_logprobs` as [logprob, token_id, text|null] triples, and with
`return_routed_experts` SGLang's `routed_experts` (rollout/routing_wire.py; from
`routed_experts_start_len`, SGLang's default 0).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rollout.embedded.sequence import Sequence
from rollout.routing_wire import RoutingLayout
from rollout.types import GenerateRequest, SamplingParams, SamplingParamsError

# top-level /generate keys that ask for something this engine does not produce
_UNSUPPORTED_IF_SET: dict[str, Callable[[Any], bool]] = {
    "input_embeds": lambda v: v is not None,
    "logprob_start_len": lambda v: v is not None and _any(v, lambda x: x >= 0),
    "top_logprobs_num": lambda v: v is not None and _any(v, lambda x: x > 0),
    "token_ids_logprob": lambda v: bool(v),
    "return_hidden_states": lambda v: _any(v, bool),
    "return_sampling_mask": lambda v: _any(v, bool),
    "lora_path": lambda v: v is not None,
    "custom_logit_processor": lambda v: v is not None,
    "image_data": lambda v: v is not None,
}


def _any(value: Any, pred: Callable[[Any], bool]) -> bool:
    items = value if isinstance(value, list) else [value]
    return any(pred(x) for x in items if x is not None)


class RequestError(ValueError):
    """A /generate body the server refuses (HTTP 400). `contract` errors are reported as
    {"error": msg} (SGLang's JSON-contract gate), others as {"error": {"message": msg}}."""

    def __init__(self, message: str, *, contract: bool = False, status: int = 400) -> None:
        super().__init__(message)
        self.contract = contract
        self.status = status

    def body(self) -> dict[str, Any]:
        msg = str(self)
        return {"error": msg} if self.contract else {"error": {"message": msg}}


@dataclass
class ParsedGenerate:
    requests: list[GenerateRequest]  # one per prompt; sampling.n samples each
    batch: bool  # answer with a JSON list (batch input, or n > 1)
    stream: bool
    return_text_in_logprobs: bool


def _prompts(body: dict[str, Any], tokenize: Callable[[str], list[int]] | None, vocab: int):
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise RequestError("Either text or input_ids should be provided (exactly one).")
    if text is not None:
        if tokenize is None:
            raise RequestError("text: this server has no tokenizer; send input_ids")
        if isinstance(text, str):
            return [tokenize(text)], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return [tokenize(t) for t in text], True
        raise RequestError("text: expected a string or a non-empty list of strings")
    if isinstance(ids, list) and ids and not any(isinstance(t, list) for t in ids):
        prompts, batch = [ids], False
    elif isinstance(ids, list) and ids and all(isinstance(p, list) and p for p in ids):
        prompts, batch = ids, True
    else:
        raise RequestError("input_ids: expected a non-empty list of ints or of int lists")
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if type(t) is not int or not 0 <= t < vocab]  # bools too
        if bad:
            where = f"input_ids[{i}]" if batch else "input_ids"
            what = "is not an int" if type(bad[0]) is not int else "is outside the vocabulary"
            raise RequestError(f"{where}: token id {bad[0]!r} {what} [0, {vocab})")
    return prompts, batch


def _per_prompt(value: Any, count: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * count
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{name}: list of {len(value)} for a batch of {count}")
        return value
    return [value] * count


def parse_generate(
    body: Any,
    tokenize: Callable[[str], list[int]] | None,
    vocab_size: int,
    *,
    max_n: int | None = None,
) -> ParsedGenerate:
    """Validate a /generate body; raises RequestError naming the offending field. `max_n`
    bounds sampling_params.n (the server's limit)."""
    if not isinstance(body, dict):
        raise RequestError("request body: expected a JSON object")
    for key, is_set in _UNSUPPORTED_IF_SET.items():
        if key in body and is_set(body[key]):
            raise RequestError(f"{key}: not supported by the embedded engine")
    prompts, batch = _prompts(body, tokenize, vocab_size)
    raw_params = _per_prompt(body.get("sampling_params"), len(prompts), "sampling_params", {})
    try:
        params = [SamplingParams.from_sglang(p) for p in raw_params]
    except SamplingParamsError as e:
        raise RequestError(str(e), contract=True) from None
    except TypeError as e:
        raise RequestError(f"sampling_params: {e}", contract=True) from None
    if len({p.n for p in params}) > 1:
        raise RequestError("The parallel_sample_num should be the same for all samples.")
    if max_n is not None and params[0].n > max_n:
        raise RequestError(f"sampling_params.n: {params[0].n} is above this server's limit {max_n}")
    rid = body.get("rid")
    if rid is None:
        rids = [uuid.uuid4().hex for _ in prompts]
    elif isinstance(rid, str):
        rids = [rid] if not batch else [f"{rid}_{i}" for i in range(len(prompts))]
    else:
        rids = _per_prompt(rid, len(prompts), "rid", None)
        if not all(isinstance(r, str) for r in rids):
            raise RequestError("rid: expected a string or a list of strings")
    logprob = _per_prompt(body.get("return_logprob"), len(prompts), "return_logprob", False)
    requests = [
        GenerateRequest(list(p), sp, rid=r, return_logprob=bool(lp))
        for p, sp, r, lp in zip(prompts, params, rids, logprob)
    ]
    _routing_options(body, requests)
    return ParsedGenerate(
        requests=requests,
        batch=batch or params[0].n > 1,
        stream=bool(body.get("stream", False)),
        return_text_in_logprobs=bool(body.get("return_text_in_logprobs", False)),
    )


def _routing_options(body: dict[str, Any], requests: list[GenerateRequest]) -> None:
    """return_routed_experts / routed_experts_start_len (per prompt or one for all)."""
    n = len(requests)
    wanted = _per_prompt(body.get("return_routed_experts"), n, "return_routed_experts", False)
    starts = _per_prompt(body.get("routed_experts_start_len"), n, "routed_experts_start_len", 0)
    for req, want, start in zip(requests, wanted, starts):
        if not want:
            continue
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise RequestError(f"routed_experts_start_len: expected an int >= 0, got {start!r}")
        req.return_routed_experts, req.routed_experts_start_len = True, start


def finish_reason_json(seq: Sequence) -> dict[str, Any] | None:
    """SGLang's FINISH_* objects (schedule_batch.py): stop/length/abort, None while running."""
    if seq.finish_reason is None:
        return None
    if seq.finish_reason == "stop":
        return {"type": "stop", "matched": seq.matched}
    if seq.finish_reason == "length":
        return {"type": "length", "length": len(seq.output_ids)}
    return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


def version_spans(versions: list[int]) -> list[dict[str, Any]]:
    """Per-token versions -> SGLang weight_versions spans [{version, start, end}) (strings)."""
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == str(v):
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": str(v), "start": i, "end": i + 1})
    return spans


def format_item(
    seq: Sequence,
    *,
    upto: int | None = None,
    current_version: int,
    decode: Callable[[list[int]], str | None],
    text_in_logprobs: bool = False,
    token_text: Callable[[int], str] | None = None,
    routing: RoutingLayout | None = None,
) -> dict[str, Any]:
    """One response object for `seq` (its first `upto` tokens while streaming)."""
    done = upto is None
    n = len(seq.output_ids) if done else upto
    ids = seq.output_ids[:n]
    versions = seq.versions[:n]
    text = decode(ids)
    if done and isinstance(seq.matched, str) and seq.finish_reason == "stop" and text:
        cut = text.find(seq.matched)
        text = text[:cut] if cut >= 0 else text
    spans = version_spans(versions)
    meta: dict[str, Any] = {
        "id": seq.rid,
        "finish_reason": finish_reason_json(seq) if done else None,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": n,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "weight_version": spans[-1]["version"] if spans else str(current_version),
        "weight_versions": spans or [{"version": str(current_version), "start": 0, "end": 0}],
        "num_retractions": seq.num_retractions,
    }
    if seq.return_logprob:
        texts = [token_text(t) if text_in_logprobs and token_text else None for t in ids]
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [
            [lp, t, s] for lp, t, s in zip(seq.logprobs[:n], ids, texts)
        ]
        meta["output_token_logprobs_length"] = n
    if done and routing is not None and seq.routing_start is not None:
        meta["routed_experts"] = routing.encode(seq.routed())
    end = seq.finished_at if done and seq.finished_at else time.monotonic()
    meta["e2e_latency"] = end - seq.created
    item: dict[str, Any] = {"output_ids": list(ids), "meta_info": meta}
    if text is not None:
        item = {"text": text, **item}
    return item
