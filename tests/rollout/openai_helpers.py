"""Shared by the OpenAI-route and agent-capture tests: a tiny model overfitted on one
tool-calling turn, so that, greedy, it really emits GLM-4.x tool-call text.

CALL_TEXT is exactly what the chat template renders for that assistant turn after
`<|assistant|>`, so a conversation that hands the call back re-renders it token for token."""

from __future__ import annotations

from pathlib import Path

import torch

from envs.tasks import tokenizer_corpus
from envs.tool_calls import ToolCall, render_tool_call
from models import save_pretrained
from models.chat import encode, prompt_ids
from models.tokenizer import build_toy_tokenizer
from tests.rollout.engine_helpers import tiny_model

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "a+b",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        },
    },
}
ASK = [{"role": "user", "content": "2+3?"}]
CALL_TEXT = "\nok\n" + render_tool_call(ToolCall("add", {"a": 2, "b": 3}))


def _overfit(model, prompt: list[int], target: list[int], steps: int = 300) -> None:
    """Train `model` until greedy decoding after `prompt` yields `target`."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor(prompt + target)
    cu = torch.tensor([0, len(ids)])
    for _ in range(steps):
        lp = model.token_logprobs(ids, cu).logprobs[len(prompt) :]
        if lp.min().item() > -0.05:
            break
        opt.zero_grad()
        (-lp.sum()).backward()
        opt.step()
    model.eval()


def build_tool_model_dir(path: Path) -> Path:
    """A checkpoint + toy tokenizer in `path` whose greedy answer to ASK (with ADD_TOOL) is
    CALL_TEXT followed by `<|observation|>`."""
    tok = build_toy_tokenizer(path, tokenizer_corpus(n_per_task=100), vocab_size=300)
    model = tiny_model(vocab_size=len(tok))
    observation = tok.convert_tokens_to_ids("<|observation|>")
    _overfit(model, prompt_ids(tok, ASK, [ADD_TOOL]), encode(tok, CALL_TEXT) + [observation])
    save_pretrained(model, path)
    return path
