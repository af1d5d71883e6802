"""Multi-turn rollout with tools: generate -> parse -> env step -> observation tokens -> repeat.

`run_episode` drives one environment (`envs.base.Env`) through one episode:

1. ``env.reset(row)`` gives the messages; the prompt is their chat-template rendering with
   ``env.tools`` (`models.chat.prompt_ids`).
2. Each turn the engine continues the whole context (prompt + response so far). Its tokens
   are appended EXACTLY as produced (never re-tokenised) with loss_mask 1, the engine's
   logprobs and weight versions. The GLM stop tokens are always stop tokens.
3. The turn is decoded (special tokens kept, final stop token removed), its tool calls are
   parsed for the record (`envs.tool_calls`), and ``env.step(text)`` answers.
4. Unless done, the observation tokens (`models.chat.observation_ids`, up to and including
   the next ``<|assistant|>``) are appended with loss_mask 0, logprob 0.0 and version -1.
   If the model ended its turn on another stop token than ``<|observation|>``, that role
   token is inserted too (mask 0), so the context stays a valid conversation.

Ends: the env says done (finish "stop"); `max_turns` model turns (finish "length",
metadata["truncated"] = "max_turns"); prompt + response would exceed `max_total_tokens`
(finish "length", "max_total_tokens"; an observation that does not fit is not appended); a
turn cut by its token budget ("length", "max_new_tokens"); an engine abort ("abort"); an
environment that raises or breaks its protocol (finish "error", metadata["error"]).

Metadata (besides the row's, see `rollout.single_turn.row_metadata`): turns, tool_calls
[{turn, name, arguments}], tool_errors [{turn, message}], num_tool_calls, env_reward (the
last reward the env gave), response_text (whole response, decoded), final_text (last model
turn), prompt_text, truncated, rid, timings {generate_s, env_s, total_s}.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from buffer.episode import NO_VERSION, Episode, FinishReason
from envs.base import Env, StepResult
from envs.tool_calls import parse_tool_calls
from models import chat
from models.tokenizer import stop_token_ids
from rewards.isolation import SyncLane
from rollout.single_turn import check_output, decode_response, row_metadata
from rollout.types import Engine, GenerateOutput, GenerateRequest, SamplingParams

OBSERVATION_TOKEN = "<|observation|>"


@dataclass
class _Trajectory:
    """The growing response: token ids and their per-token mask, logprobs and versions."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def add_generated(self, output: GenerateOutput) -> None:
        self.ids += output.output_ids
        self.mask += [1] * len(output.output_ids)
        self.logprobs += list(output.logprobs)
        self.versions += list(output.versions)

    def add_inserted(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [NO_VERSION] * len(ids)

    routing: list[np.ndarray] = field(default_factory=list)  # R3: chunks of [n, n_moe, k]
    routed_len: int = 0

    def add_routing(self, output: GenerateOutput) -> None:
        """Keep the rows of positions no earlier turn consumed: each turn's rows start at the
        same position; those an earlier turn recorded were re-prefilled, not sampled, here."""
        rows = output.routed_experts
        if rows is not None and len(rows) > self.routed_len:
            self.routing.append(rows[self.routed_len :])
            self.routed_len = len(rows)


@dataclass
class _Record:
    """What the loop learned, turned into episode metadata at the end."""

    finish: FinishReason = FinishReason.STOP
    turns: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_errors: list[dict[str, Any]] = field(default_factory=list)
    final_text: str = ""
    env_reward: float | None = None
    truncated: str | None = None
    error: str | None = None
    generate_s: float = 0.0
    env_s: float = 0.0

    def stop(self, finish: FinishReason, truncated: str | None = None) -> None:
        self.finish, self.truncated = finish, truncated

    def note_turn(self, turn: int, text: str, tools: Any) -> None:
        parsed = parse_tool_calls(text, tools)
        self.tool_calls += [
            {"turn": turn, "name": c.name, "arguments": c.arguments} for c in parsed.calls
        ]
        self.tool_errors += [{"turn": turn, "message": m} for m in parsed.errors]
        self.final_text = text


async def run_episode(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    task_row: Mapping[str, Any],
    sampling: SamplingParams,
    *,
    max_turns: int,
    max_total_tokens: int,
    rid: str | None = None,
    step_timeout_s: float | None = None,
    routing: str | None = None,
) -> Episode:
    """Run one multi-turn episode (see module doc). Engine errors propagate; env errors
    become an error episode. `env` must be fresh (one instance per episode).
    step_timeout_s: bound on each env.step call (a sync one runs in its own thread and is
    abandoned on timeout); None = unbounded, sync steps inline.
    routing (R3): "response" or "all" records the engine's experts of the response (every
    turn's tokens, tool tokens included) or of the prompt too; None records none."""
    if routing not in (None, "response", "all"):
        raise ValueError(f"routing: expected None, 'response' or 'all', got {routing!r}")
    if max_turns < 1 or max_total_tokens < 1:
        raise ValueError(
            f"max_turns and max_total_tokens must be >= 1, got {max_turns}, {max_total_tokens}"
        )
    start = time.monotonic()
    rid = rid or f"{task_row.get('id', 'episode')}-{uuid.uuid4().hex[:8]}"
    messages = env.reset(task_row)
    prompt = chat.prompt_ids(tokenizer, messages, env.tools)
    stops = stop_token_ids(tokenizer)
    sampling = replace(sampling, n=1, stop_token_ids=sorted({*sampling.stop_token_ids, *stops}))
    trajectory, record = _Trajectory(), _Record()
    routing_from = None if routing is None else 0 if routing == "all" else len(prompt)
    if len(prompt) >= max_total_tokens:
        record.stop(FinishReason.LENGTH, "max_total_tokens")
    else:
        await _loop(
            engine,
            tokenizer,
            env,
            prompt,
            sampling,
            trajectory,
            record,
            max_turns=max_turns,
            max_total_tokens=max_total_tokens,
            rid=rid,
            step_timeout_s=step_timeout_s,
            routing_start=routing_from,
        )
    episode = _episode(tokenizer, task_row, prompt, trajectory, record, stops, rid, start)
    if routing_from is not None and trajectory.routing:
        episode.routed_experts = np.concatenate(trajectory.routing)
        episode.routing_start = routing_from
        episode.validate()
    return episode


async def _loop(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    prompt: list[int],
    sampling: SamplingParams,
    trajectory: _Trajectory,
    record: _Record,
    *,
    max_turns: int,
    max_total_tokens: int,
    rid: str,
    step_timeout_s: float | None = None,
    routing_start: int | None = None,
) -> None:
    observation_id = tokenizer.convert_tokens_to_ids(OBSERVATION_TOKEN)
    stops = set(sampling.stop_token_ids)
    for turn in range(max_turns):
        budget = max_total_tokens - len(prompt) - len(trajectory.ids)
        request = GenerateRequest(
            input_ids=prompt + trajectory.ids,
            sampling=replace(sampling, max_new_tokens=min(sampling.max_new_tokens, budget)),
            rid=f"{rid}-t{turn}",
            return_routed_experts=routing_start is not None,
            routed_experts_start_len=routing_start,
        )
        began = time.monotonic()
        (output,) = await engine.generate([request])
        record.generate_s += time.monotonic() - began
        check_output(output)
        trajectory.add_generated(output)
        trajectory.add_routing(output)
        record.turns += 1
        if output.finish_reason == "abort":
            return record.stop(FinishReason.ABORT)
        text = decode_response(tokenizer, output.output_ids, stop_ids=list(stops))
        record.note_turn(turn, text, env.tools)
        if output.finish_reason == "length":
            cut = "max_total_tokens" if _fills_budget(budget, output) else "max_new_tokens"
            return record.stop(FinishReason.LENGTH, cut)
        result = await _step(env, text, record, step_timeout_s)
        if result is None:
            return record.stop(FinishReason.ERROR)
        if result.reward is not None:
            record.env_reward = float(result.reward)
        if result.done:
            return record.stop(FinishReason.STOP)
        if turn == max_turns - 1:
            return record.stop(FinishReason.LENGTH, "max_turns")
        ended_on_observation = bool(output.output_ids) and output.output_ids[-1] == observation_id
        observation = chat.observation_ids(
            tokenizer, result.observations, include_role=not ended_on_observation
        )
        if len(prompt) + len(trajectory.ids) + len(observation) >= max_total_tokens:
            return record.stop(FinishReason.LENGTH, "max_total_tokens")
        trajectory.add_inserted(observation)


def _fills_budget(budget: int, output: GenerateOutput) -> bool:
    """True when the turn used the whole remaining token budget of the episode."""
    return len(output.output_ids) >= budget


async def _call_step(env: Env, text: str, timeout_s: float | None) -> Any:
    """env.step(text) under `timeout_s`: an async step is cancelled, a sync one runs in its
    own daemon thread (rewards.isolation) and is abandoned, so a hung env cannot hold the
    worker's event loop; without a timeout a sync step runs inline."""
    if timeout_s is None:
        result = env.step(text)
        return await result if inspect.isawaitable(result) else result
    if inspect.iscoroutinefunction(env.step):
        return await asyncio.wait_for(env.step(text), timeout_s)
    lane = SyncLane(f"env-{type(env).__name__}", 1)  # one env per episode: steps in turn
    result = await asyncio.wait_for(lane.call(env.step, text), timeout_s)
    if inspect.isawaitable(result):
        result = await asyncio.wait_for(result, timeout_s)
    return result


async def _step(
    env: Env, text: str, record: _Record, timeout_s: float | None = None
) -> StepResult | None:
    """env.step(text), awaited if async; None (and record.error) if it raises, times out or
    misbehaves."""
    began = time.monotonic()
    try:
        result = await _call_step(env, text, timeout_s)
    except TimeoutError:
        record.error = f"env {type(env).__name__}.step timed out after {timeout_s:g}s"
        return None
    except Exception as exc:  # noqa: BLE001 - an env bug fails this episode, not the batch
        record.error = f"env {type(env).__name__}.step raised {type(exc).__name__}: {exc}"
        return None
    finally:
        record.env_s += time.monotonic() - began
    if not isinstance(result, StepResult):
        record.error = (
            f"env {type(env).__name__}.step returned {type(result).__name__}, expected StepResult"
        )
        return None
    if not result.done and not result.observations:
        record.error = f"env {type(env).__name__}.step: not done but no observations"
        return None
    return result


def _episode(
    tokenizer: PreTrainedTokenizerBase,
    task_row: Mapping[str, Any],
    prompt: list[int],
    trajectory: _Trajectory,
    record: _Record,
    stops: list[int],
    rid: str,
    start: float,
) -> Episode:
    ended_on_stop = record.finish is FinishReason.STOP
    response_text = decode_response(
        tokenizer, trajectory.ids, stop_ids=stops if ended_on_stop else ()
    )
    metadata = {
        **row_metadata(task_row),
        "rid": rid,
        "turns": record.turns,
        "tool_calls": record.tool_calls,
        "tool_errors": record.tool_errors,
        "num_tool_calls": len(record.tool_calls),
        "response_text": response_text,
        "final_text": record.final_text,
        "prompt_text": tokenizer.decode(prompt),
        "timings": {
            "generate_s": record.generate_s,
            "env_s": record.env_s,
            "total_s": time.monotonic() - start,
        },
    }
    if record.env_reward is not None:
        metadata["env_reward"] = record.env_reward
    if record.truncated is not None:
        metadata["truncated"] = record.truncated
    episode = Episode(
        prompt_ids=prompt,
        response_ids=trajectory.ids,
        loss_mask=np.asarray(trajectory.mask, dtype=np.uint8),
        rollout_logprobs=trajectory.logprobs,
        versions=trajectory.versions,
        finish_reason=record.finish if record.finish is not FinishReason.ERROR else "stop",
        metadata=metadata,
    )
    if record.finish is FinishReason.ERROR:
        episode.mark_error(record.error or "environment error")
    return episode
