"""Single-turn rollout: n samples of one prompt -> n Episodes, every response token trainable.

`generate_group` sends n requests (``n = 1`` each, seeds ``sampling_seed + i`` when a seed
is set, so samples differ yet reproduce) in one `Engine.generate` call and wraps each output
as an `Episode` with the engine's logprobs, per-token weight versions and finish reason.

Before scoring, a rollout must set ``metadata["response_text"]`` (the reward contract in
`rewards.protocol`): here it is the decoded response (special tokens kept, a final stop
token or stop string removed) when a tokenizer is given, else the engine's own `text`.
`row_metadata` turns a dataset row into the metadata every episode of its group carries.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from buffer.episode import TOKEN_DTYPE, Episode, EpisodeError, FinishReason
from models.chat import decode
from rollout.types import Engine, GenerateOutput, GenerateRequest, SamplingParams

RESERVED_KEYS = ("prompt_id", "task", "label", "response_text", "final_text", "error")


def row_metadata(task_row: Mapping[str, Any]) -> dict[str, Any]:
    """Episode metadata for a dataset row: prompt_id, task, label and the row's "metadata"
    entries (flattened; e.g. countdown's "numbers"), which may not shadow reserved keys."""
    extra = dict(task_row.get("metadata") or {})
    clashes = sorted(set(extra) & set(RESERVED_KEYS))
    if clashes:
        raise ValueError(f"task row {task_row.get('id')!r}: metadata keys {clashes} are reserved")
    out: dict[str, Any] = {"prompt_id": task_row.get("id"), "task": task_row.get("task")}
    if task_row.get("label") is not None:
        out["label"] = str(task_row["label"])
    return {**extra, **out}


def check_output(output: GenerateOutput) -> None:
    """ValueError naming the field when an engine output is inconsistent."""
    n = len(output.output_ids)
    if len(output.logprobs) != n or len(output.versions) != n:
        raise ValueError(
            f"engine output {output.rid!r}: output_ids has {n} tokens but logprobs has "
            f"{len(output.logprobs)} and versions {len(output.versions)}"
        )
    if output.finish_reason not in ("stop", "length", "abort"):
        raise ValueError(
            f"engine output {output.rid!r}: finish_reason {output.finish_reason!r} is not "
            "one of stop, length, abort"
        )


def decode_response(
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[int],
    *,
    stop_ids: Sequence[int] = (),
    stop_text: str | None = None,
) -> str:
    """Decode `ids` keeping special tokens, without a final stop token / stop string."""
    ids = list(ids)
    if ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    text = decode(tokenizer, ids)
    if stop_text and text.endswith(stop_text):
        text = text[: -len(stop_text)]
    return text


def output_text(
    output: GenerateOutput, tokenizer: PreTrainedTokenizerBase | None, stop_ids: Sequence[int]
) -> str | None:
    """The response text of one output (see module doc), or None with neither source."""
    if tokenizer is None:
        return output.text
    matched = output.matched_stop
    ids = [matched] if isinstance(matched, int) else []
    if output.finish_reason == "stop":
        ids += list(stop_ids)
    stop_text = matched if isinstance(matched, str) else None
    return decode_response(tokenizer, output.output_ids, stop_ids=ids, stop_text=stop_text)


async def generate_group(
    engine: Engine,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    n: int,
    *,
    metadata: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    rid_prefix: str | None = None,
    routed_experts_from: int | None = None,
) -> list[Episode]:
    """n samples of one prompt as Episodes (loss_mask all 1).

    prompt_ids  int [P], the templated prompt
    metadata    copied into every episode (e.g. `row_metadata(row)`), plus sample_index,
                rid, response_text (see module doc), prompt_text (with a tokenizer) and
                timings.generate_s
    routed_experts_from  ask the engine for the experts it used from this position on (R3:
                P = the response, 0 = the prompt too); None = do not ask
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    prefix = rid_prefix or f"{metadata.get('prompt_id', 'prompt')}-{uuid.uuid4().hex[:8]}"
    # with a tokenizer the response text is decoded here (output_text), not by the engine
    requests = _requests(prompt_ids, sampling, n, prefix, routed_experts_from, tokenizer is None)
    start = time.monotonic()
    outputs = await engine.generate(requests)
    elapsed = time.monotonic() - start
    if len(outputs) != n:
        raise ValueError(f"engine returned {len(outputs)} outputs for {n} requests")
    stop_ids = _stop_ids(sampling, tokenizer)
    prompt_text = decode(tokenizer, prompt_ids) if tokenizer is not None else None
    prompt = np.asarray(prompt_ids, TOKEN_DTYPE)  # once a group; each episode gets a copy
    if prompt.ndim != 1:
        raise EpisodeError(f"prompt_ids: expected a 1-D array, got shape {prompt.shape}")
    episodes = []
    for index, output in enumerate(outputs):
        check_output(output)
        meta = {**metadata, "sample_index": index, "rid": output.rid}
        text = output_text(output, tokenizer, stop_ids)
        episodes.append(_episode(output, prompt.copy(), meta, elapsed, text, prompt_text))
    return episodes


def _requests(
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    n: int,
    prefix: str,
    routed_experts_from: int | None,
    return_text: bool = True,
) -> list[GenerateRequest]:
    """n one-sample requests `{prefix}-{i}`; seed + i per sample when a seed is set, so the
    samples differ yet reproduce."""
    sampling.validate()  # once: a copy that sets n = 1 and an int seed stays valid
    seed = sampling.sampling_seed
    return [
        GenerateRequest(
            input_ids=list(prompt_ids),
            sampling=_sample_params(sampling, None if seed is None else seed + i),
            rid=f"{prefix}-{i}",
            return_routed_experts=routed_experts_from is not None,
            routed_experts_start_len=routed_experts_from,
            return_text=return_text,
        )
        for i in range(n)
    ]


def _sample_params(sampling: SamplingParams, seed: int | None) -> SamplingParams:
    """`replace(sampling, n=1, sampling_seed=seed)` without re-running its validation, which
    is most of the cost of a request on the rollout's event loop (once per sample)."""
    params = copy.copy(sampling)
    params.n = 1
    params.sampling_seed = seed
    return params


def _stop_ids(sampling: SamplingParams, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Stop tokens a response may end with (not kept in its text): the sampling's and EOS."""
    stop_ids = list(sampling.stop_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        stop_ids.append(int(tokenizer.eos_token_id))
    return stop_ids


def _episode(
    output: GenerateOutput,
    prompt_ids: np.ndarray,
    meta: dict[str, Any],
    generate_s: float,
    response_text: str | None,
    prompt_text: str | None,
) -> Episode:
    """One checked output as an Episode; `meta` gains timings.generate_s and the texts."""
    meta["timings"] = {**dict(meta.get("timings") or {}), "generate_s": generate_s}
    if response_text is not None:
        meta["response_text"] = response_text
    if prompt_text is not None:
        meta["prompt_text"] = prompt_text
    return Episode.from_generation(
        prompt_ids=prompt_ids,
        response_ids=output.output_ids,
        logprobs=output.logprobs,
        versions=output.versions,
        finish_reason=FinishReason(output.finish_reason),
        metadata=meta,
        routed_experts=output.routed_experts,
        routing_start=output.routed_experts_start,
    )
