"""Agent episodes: run a user's OpenAI-client agent against the worker's engine, token-exactly.

`AgentRunner.run(task, sampling)` gives the agent (`envs.agent`) an `openai.AsyncOpenAI`
whose API key names a fresh episode on the worker's `AgentServer`, awaits
``agent(client, task)`` under a timeout, and turns the recorded calls into Episodes with
`rollout.agent_capture.build_episodes`: the engine's sampled tokens with loss_mask 1 and its
logprobs and versions, everything between calls with loss_mask 0.

* Concurrency: at most `max_concurrent` agent runs at once per worker (the engine's KV
  slots), however many groups the producer has in flight.
* The agent's return value is kept in metadata (``agent_reward`` or ``agent_rewards``) for
  the reward plugins (built-in `agent` passes it through; others score the same episode).
* An agent that raises, times out or returns something that is not a reward gives episodes
  with finish_reason error (metadata["error"] names the exception), counted in `AgentStats`
  by exception type; the job goes on. With no recorded call the episode is the task's prompt
  and an empty response.
* A prefix mismatch between calls splits the run into several episodes or drops it
  (`env.on_prefix_mismatch`); a dropped run leaves one episode with nothing to train on
  (its first prompt, an empty response), so its group keeps its n rewards.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from buffer.episode import Episode
from envs.agent import Agent
from models.chat import prompt_ids
from rewards.protocol import to_scalar
from rollout.agent_capture import PrefixPolicy, build_episodes
from rollout.agent_server import AgentServer, RecordedCall
from rollout.single_turn import decode_response, row_metadata
from rollout.types import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class AgentStats:
    """Counters of one worker's agent runs, for the metrics (summed over workers)."""

    runs: int = 0
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    prefix_mismatches: int = 0
    split_runs: int = 0
    dropped_runs: int = 0
    error_types: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, float]:
        out = {
            "agent/runs": float(self.runs),
            "agent/calls": float(self.calls),
            "agent/errors": float(self.errors),
            "agent/timeouts": float(self.timeouts),
            "agent/prefix_mismatches": float(self.prefix_mismatches),
            "agent/split_runs": float(self.split_runs),
            "agent/dropped_runs": float(self.dropped_runs),
        }
        out.update({f"agent/error/{k}": float(v) for k, v in self.error_types.items()})
        return out


def _no_keepalive_client() -> Any:
    """An HTTP client opening one loopback connection per call: a kept-alive connection can
    be closed by uvicorn (5 s idle) just as the client reuses it, a failed call that no
    retry may repeat (seen as APIConnectionError under load)."""
    import httpx2  # the HTTP library of openai 3.x (the `agents` extra pins it)
    import openai

    return openai.DefaultAsyncHttpxClient(
        limits=httpx2.Limits(max_connections=16, max_keepalive_connections=0)
    )


@dataclass
class _Outcome:
    rewards: tuple[float, Mapping[str, float]] | None = None
    error: str | None = None


class AgentRunner:
    """Runs agent episodes on one worker's engine (see module doc)."""

    def __init__(
        self,
        agent: Agent,
        server: AgentServer,
        tokenizer: Any,
        *,
        timeout_s: float,
        on_prefix_mismatch: PrefixPolicy,
        max_concurrent: int,
    ) -> None:
        self.agent, self.server, self.tokenizer = agent, server, tokenizer
        self.timeout_s = timeout_s
        self.on_prefix_mismatch = on_prefix_mismatch
        self.limit = asyncio.Semaphore(max_concurrent)
        self.stats = AgentStats()

    async def run(self, task: Mapping[str, Any], sampling: SamplingParams) -> list[Episode]:
        """The episode(s) of one agent run on `task` (scored later by the reward plugins)."""
        import openai  # the `agents` extra; checked at start-up by the worker

        async with self.limit:
            began = time.monotonic()
            with self.server.episode(sampling) as recorder:
                client = openai.AsyncOpenAI(
                    base_url=self.server.base_url,
                    api_key=recorder.key,
                    max_retries=0,  # a retried call could be sampled twice
                    timeout=self.timeout_s,
                    http_client=_no_keepalive_client(),
                )
                try:
                    outcome = await self._call_agent(client, task)
                finally:
                    await client.close()
            calls = self.server.calls(recorder)
        return self._episodes(task, calls, outcome, time.monotonic() - began)

    async def _call_agent(self, client: Any, task: Mapping[str, Any]) -> _Outcome:
        name = getattr(self.agent, "__qualname__", type(self.agent).__name__)
        try:
            value = await asyncio.wait_for(self.agent(client, copy.deepcopy(dict(task))),
                                           self.timeout_s)  # fmt: skip
            return _Outcome(rewards=to_scalar(value, None, "agent"))
        except TimeoutError:
            self.stats.timeouts += 1
            return self._failed("TimeoutError", f"agent {name} timed out after {self.timeout_s} s")
        except ValueError as exc:  # to_scalar: not a reward
            return self._failed(type(exc).__name__, f"agent {name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - an agent bug fails its episode, not the job
            log.warning("agent %s failed on task %r: %r", name, task.get("id"), exc)
            return self._failed(
                type(exc).__name__, f"agent {name} raised {type(exc).__name__}: {exc}"
            )

    def _failed(self, kind: str, message: str) -> _Outcome:
        self.stats.errors += 1
        self.stats.error_types[kind] += 1
        return _Outcome(error=message)

    def _episodes(
        self, task: Mapping[str, Any], calls: list[RecordedCall], outcome: _Outcome, seconds: float
    ) -> list[Episode]:
        self.stats.runs += 1
        self.stats.calls += len(calls)
        meta = row_metadata(task)
        result = build_episodes([c.call for c in calls], self.on_prefix_mismatch, meta)
        self.stats.prefix_mismatches += result.prefix_mismatches
        episodes = result.episodes
        if result.prefix_mismatches and episodes:
            self.stats.split_runs += 1
        if calls and not episodes:
            self.stats.dropped_runs += 1
        if not episodes:  # no call, or dropped: nothing to train on, but a reward to count
            first = calls[0].call.prompt_ids if calls else self._task_prompt(task)
            episodes = [Episode.from_generation(first, [], [], [], "stop", {**meta, "calls": 0})]
            if calls:
                episodes[0].metadata["dropped"] = "prefix_mismatch"
        final = calls[-1].content if calls else ""
        tool_calls = [
            {"turn": turn, "name": t["name"], "arguments": t["arguments"]}
            for turn, c in enumerate(calls)
            for t in c.tool_calls
        ]
        for episode in episodes:
            episode.metadata.update(
                response_text=decode_response(self.tokenizer, episode.response_ids.tolist()),
                final_text=final,
                turns=len(calls),
                tool_calls=tool_calls,
                num_tool_calls=len(tool_calls),
                prefix_mismatches=result.prefix_mismatches,
                agent_seconds=round(seconds, 4),
            )
            if outcome.rewards is not None:
                scalar, components = outcome.rewards
                episode.metadata["agent_reward"] = scalar
                if components:
                    episode.metadata["agent_rewards"] = dict(components)
            else:
                episode.mark_error(outcome.error or "agent failed")
        return episodes

    def _task_prompt(self, task: Mapping[str, Any]) -> list[int]:
        """The task's messages as a prompt (for an episode without calls); a stop token if
        the task has none, so the episode is never empty."""
        messages = task.get("messages")
        if isinstance(messages, list) and messages:
            try:
                return prompt_ids(self.tokenizer, messages, task.get("tools"))
            except Exception:  # noqa: BLE001 - a task the template cannot render
                pass
        return [int(self.tokenizer.eos_token_id or 0)]
