"""A GenerateRequest turned into the embedded engine's Sequences: validation, stop rule,
sample rids and seeds, and the first position whose experts the request wants (R3).

Samples of one request with n > 1 get rids `f"{rid}_{j}"` (SGLang's naming). Sample j of a
request with `sampling_seed = s` uses seed `s` for j = 0 and a seed derived from (s, j)
otherwise, so the n samples differ but are reproducible.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import Future

from rollout.embedded.sequence import Sequence, StopRule
from rollout.types import GenerateRequest

_SEED_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request whose sampling_seed is `seed`."""
    return seed if index == 0 else (seed * 6364136223846793005 + index * _SEED_MIX) % (1 << 63)


def routing_start(request: GenerateRequest, prompt_len: int) -> int | None:
    """The first position whose experts the request wants (R3), None when it wants none."""
    if not request.return_routed_experts:
        return None
    start = request.routed_experts_start_len
    if start is None:
        return prompt_len
    if not 0 <= start <= prompt_len:
        raise ValueError(
            f"routed_experts_start_len: expected 0..{prompt_len} (the prompt length), got {start}"
        )
    return start


def build_sequences(
    request: GenerateRequest,
    *,
    check_length: Callable[[int, int], None],
    eos_ids: frozenset[int],
    encode: Callable[[str], list[int]] | None,
    draw_seed: Callable[[], int],
    on_update: Callable[[Sequence], None] | None = None,
) -> list[Sequence]:
    """The n Sequences of a request, validated (raises ValueError naming the field).

    check_length(prompt_len, max_new_tokens) raises when they do not fit a slot; draw_seed()
    gives the base seed of a request without sampling_seed."""
    params = request.sampling
    params.validate()
    prompt = [int(t) for t in request.input_ids]
    check_length(len(prompt), params.max_new_tokens)
    stop = StopRule.build(params, eos_ids, encode)
    rid = request.rid or uuid.uuid4().hex
    start = routing_start(request, len(prompt))
    top_n = request.top_logprobs_num
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise ValueError(f"top_logprobs_num: expected an int >= 0, got {top_n!r}")
    base = params.sampling_seed if params.sampling_seed is not None else draw_seed()
    return [
        Sequence(
            rid=rid if params.n == 1 else f"{rid}_{j}",
            group=rid,
            prompt_ids=prompt,
            params=params,
            stop=stop,
            seed=sample_seed(base, j),
            return_logprob=request.return_logprob,
            return_text=request.return_text,
            top_logprobs_num=top_n,
            on_update=on_update,
            done=Future(),
            routing_start=start,
        )
        for j in range(params.n)
    ]
