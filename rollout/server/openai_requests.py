"""OpenAI request bodies -> the engine's prompts and SamplingParams.

Chat messages are rendered by the model's chat template (models.chat), tools included, so
`assistant` turns with `tool_calls` and `tool` results come back in GLM's own format. Every
refusal is an OpenAIError naming the request parameter. OpenAI parameters this engine cannot
honour (penalties, logit_bias, JSON response formats, forced tool choice,
echo, suffix) are refused unless left at their neutral value, never silently ignored.
"""

from __future__ import annotations

import uuid
from typing import Any

from jinja2.exceptions import TemplateError

from models.chat import prompt_ids as chat_prompt_ids
from rollout.embedded.engine import EmbeddedEngine
from rollout.embedded.sequence import Sequence
from rollout.server.openai_errors import OpenAIError
from rollout.server.openai_protocol import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
)
from rollout.server.state import ServerState
from rollout.types import GenerateRequest, SamplingParams, SamplingParamsError

# SamplingParams field -> the OpenAI parameter a user sets
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "sampling_seed": "seed"}


def served_model(state: ServerState) -> str:
    """The model id /v1/models lists and requests must name (SGLang: the model path)."""
    return state.served_model_name or state.model_path


def check_model(state: ServerState, name: str) -> None:
    if name != served_model(state):
        raise OpenAIError(
            f"The model `{name}` does not exist; this server serves `{served_model(state)}`",
            param="model",
            status=404,
            code="model_not_found",
        )


def _refuse_unless_neutral(req: ChatCompletionRequest | CompletionRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise OpenAIError(f"{name}: not supported by this engine (only 0)", param=name)
    if req.logit_bias:
        raise OpenAIError("logit_bias: not supported by this engine", param="logit_bias")


def _template_message(m: ChatMessageIn) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    out: dict[str, Any] = {
        "role": "system" if m.role == "developer" else m.role,
        "content": content or "",
    }
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    for key in ("name", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def chat_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as JSON schemas (None without tools); checks tool_choice against them."""
    choice = req.tool_choice
    if choice is not None and not req.tools:
        raise OpenAIError("tool_choice: only allowed when tools are given", param="tool_choice")
    if choice not in (None, "auto", "none"):
        raise OpenAIError(
            "tool_choice: only 'auto' and 'none' are supported (this engine does not "
            "constrain decoding to force a call)",
            param="tool_choice",
        )
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def chat_prompt(engine: EmbeddedEngine, req: ChatCompletionRequest) -> list[int]:
    """Prompt ids of the conversation (generation prompt appended); checks every option."""
    _refuse_unless_neutral(req)
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise OpenAIError(
            f"response_format: only type 'text' is supported, got {fmt!r}",
            param="response_format",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError("top_logprobs: requires logprobs to be true", param="top_logprobs")
    if engine.tokenizer is None:
        raise OpenAIError("messages: this server has no tokenizer", param="messages")
    tools = chat_tools(req)
    messages = [_template_message(m) for m in req.messages]
    try:
        return chat_prompt_ids(engine.tokenizer, messages, tools)
    except ValueError as e:  # messages[i].tool_calls[j].function.arguments: not valid JSON
        where = str(e).split(":", 1)[0]
        param = where if where.startswith("messages") else "messages"
        raise OpenAIError(str(e), param=param) from None
    except TemplateError as e:
        raise OpenAIError(f"messages: {e}", param="messages") from None


def completion_prompts(engine: EmbeddedEngine, req: CompletionRequest) -> list[list[int]]:
    """One prompt (ids) per entry of `prompt`; checks every option."""
    _refuse_unless_neutral(req)
    if req.echo:
        raise OpenAIError("echo: not supported by this engine (only false)", param="echo")
    if req.suffix is not None:
        raise OpenAIError("suffix: not supported by this engine", param="suffix")
    if req.best_of not in (None, req.n):
        raise OpenAIError("best_of: only null or equal to n is supported", param="best_of")
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        if engine.tokenizer is None:
            raise OpenAIError("prompt: no tokenizer here; send token ids", param="prompt")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [engine.tokenizer.encode(t) for t in texts]  # as /generate's `text`
    if not prompt:
        raise OpenAIError("prompt: expected a non-empty string, ids or list", param="prompt")
    batch = [list(p) for p in prompt] if isinstance(prompt[0], list) else [list(prompt)]
    vocab = int(engine.model.config.vocab_size)
    for ids in batch:
        bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab]  # bools too
        if bad or not ids:
            raise OpenAIError(
                f"prompt: token id {bad[0] if bad else None!r} is outside the vocabulary "
                f"[0, {vocab}) or a prompt is empty",
                param="prompt",
            )
    return batch


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int, stop_param: str = "stop"
) -> SamplingParams:
    stop = req.stop if req.stop is not None else []
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else float(req.min_p),
            stop=[stop] if isinstance(stop, str) else list(stop),
            ignore_eos=req.ignore_eos,
            sampling_seed=req.seed,
            n=req.n,
        )
    except SamplingParamsError as e:
        field = str(e).split(":", 1)[0]
        raise OpenAIError(str(e), param=_PARAM_NAMES.get(field, field)) from None


def check_n(samples: int, limit: int) -> None:
    """The samples one request asks for (n, times the prompts of a completion) within the
    server's limit (ServerState.max_n)."""
    if samples > limit:
        raise OpenAIError(f"n: {samples} samples is above this server's limit {limit}", param="n")


def max_new_tokens(engine: EmbeddedEngine, prompt_len: int, asked: int | None, prompt_param: str):
    """`asked`, or what the context leaves after the prompt when not given."""
    room = engine.sched.context_len - prompt_len
    if room < 1:
        raise OpenAIError(
            f"{prompt_param}: {prompt_len} prompt tokens leave no room in the model's context "
            f"of {engine.sched.context_len} tokens",
            param=prompt_param,
        )
    return room if asked is None else asked


def make_sequences(
    engine: EmbeddedEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    prefix: str,
    max_param: str,
    top_logprobs: int = 0,
) -> tuple[str, list[Sequence]]:
    """(response id, the n sequences of each prompt in order); errors name `max_param`.
    `top_logprobs` > 0 makes the engine record that many most likely tokens per position."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    seqs: list[Sequence] = []
    for i, prompt in enumerate(prompts):
        request = GenerateRequest(
            prompt, params, rid=f"{rid}-{i}", return_logprob=True, top_logprobs_num=top_logprobs
        )
        try:
            seqs.extend(engine.make_sequences(request))
        except ValueError as e:  # context length, stop strings without a tokenizer
            param = "stop" if str(e).startswith("stop") else max_param
            message = str(e) if str(e).startswith(param) else f"{param}: {e}"
            raise OpenAIError(message, param=param) from None
    return rid, seqs
