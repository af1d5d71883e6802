"""A remote reward model over HTTP: batched JSON POST, retries with backoff, timeout.

Wire format (slime's remote_rm item, sent in batches):

* request: ``POST url`` with a JSON array, one object per episode:
  ``{"prompt": str | null, "response": str, "label": str | null}`` (prompt from
  ``metadata["prompt_text"]``, response from ``metadata["response_text"]``);
* response: a JSON array with one reward per item, in order (a number, or an object of
  numbers for a multi-component reward), or an object ``{"rewards": [...]}``.

Episodes are sent in chunks of `batch_size`, concurrently. Each POST has a `timeout_s`
timeout; connection errors, timeouts, HTTP 429 and 5xx are retried up to `max_retries` times
with exponential backoff (`backoff_s * 2**attempt`, capped at `max_backoff_s`). Other 4xx
answers and malformed bodies fail at once. A failure raises, and `RewardFn` marks the
episodes of that call as errors.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any

import httpx

from buffer.episode import Episode
from rewards.protocol import RewardValue, response_text

logger = logging.getLogger(__name__)


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or answered with something unusable."""


class _Retryable(Exception):
    pass


class RemoteRewardModel:
    """Batch reward plugin calling a reward server (see module doc for the wire format)."""

    reward_batched = True

    def __init__(
        self,
        *,
        url: str,
        batch_size: int = 32,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected an http(s) URL, got {url!r}")
        if batch_size < 1 or max_retries < 0 or not timeout_s > 0 or backoff_s < 0:
            raise ValueError(
                "batch_size >= 1, max_retries >= 0, timeout_s > 0 and backoff_s >= 0 expected, "
                f"got {batch_size}, {max_retries}, {timeout_s}, {backoff_s}"
            )
        self.url = url
        self.batch_size = batch_size
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.headers = dict(headers or {})

    async def __call__(self, episodes: list[Episode]) -> list[RewardValue]:
        items = [_item(e) for e in episodes]
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        # One client per call: an AsyncClient is bound to the event loop it first runs on.
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as client:
            answers = await asyncio.gather(*(self._post(client, chunk) for chunk in chunks))
        return [value for answer in answers for value in answer]

    async def _post(self, client: httpx.AsyncClient, chunk: list[dict[str, Any]]) -> list[Any]:
        for attempt in range(self.max_retries + 1):
            try:
                response = await client.post(self.url, json=chunk)
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Retryable(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise RemoteRewardError(
                        f"{self.url} answered HTTP {response.status_code}: {response.text[:200]}"
                    )
                return _parse(response, len(chunk), self.url)
            except (httpx.TransportError, _Retryable) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if attempt == self.max_retries:
                    raise RemoteRewardError(
                        f"{self.url} failed after {attempt + 1} attempts: {reason}"
                    ) from exc
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                logger.info("remote_rm %s: %s; retry %d in %.2fs", self.url, reason, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises


def _item(episode: Episode) -> dict[str, Any]:
    label = episode.metadata.get("label")
    return {
        "prompt": episode.metadata.get("prompt_text"),
        "response": response_text(episode),
        "label": None if label is None else str(label),
    }


def _parse(response: httpx.Response, expected: int, url: str) -> list[Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise RemoteRewardError(f"{url} answered a non-JSON body: {response.text[:200]}") from exc
    if isinstance(body, Mapping):
        body = body.get("rewards")
    if not isinstance(body, list) or len(body) != expected:
        raise RemoteRewardError(
            f"{url} answered {str(body)[:200]}; expected a list of {expected} rewards "
            "(or {'rewards': [...]})"
        )
    for value in body:
        numbers = value.values() if isinstance(value, Mapping) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise RemoteRewardError(f"{url} answered a non-numeric reward {value!r}")
    return body
