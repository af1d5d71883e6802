"""Shared builders for the embedded-engine, server and client tests: a tiny in-process
Glm4MoeForCausalLM (larger init so greedy outputs vary), its uncached greedy reference and
the model's own token logprobs."""

from __future__ import annotations

import asyncio
import contextlib
import time

import torch

from models import Glm4MoeForCausalLM, get_preset


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> Glm4MoeForCausalLM:
    cfg = get_preset("glm4moe-tiny", initializer_range=std, **overrides)
    model = Glm4MoeForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


@torch.no_grad()
def uncached_logits(model: Glm4MoeForCausalLM, ids: list[int]) -> torch.Tensor:
    """float32 [V]: next-token logits after `ids` from the plain (packed, uncached) forward."""
    out = model.forward_packed(torch.tensor(ids), torch.tensor([0, len(ids)]))
    return model.lm_head(out.hidden[-1]).float()


# Greedy tokens of two compute paths (the engine's cached, batched forward vs this uncached
# one) are compared exactly. The paths' logits differ by fp32 round-off (~2e-6 here; the CPU's
# kernels may change it), so exact equality holds on any CPU only without near-ties: every
# reference step must lead by TIE_MARGIN (the tests' prompts: >= 1.9e-4).
TIE_MARGIN = 5e-5


def greedy_reference(model: Glm4MoeForCausalLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for step in range(n):
        top = uncached_logits(model, seq).topk(2)
        margin = float(top.values[0] - top.values[1])
        assert margin > TIE_MARGIN, (
            f"greedy reference of {prompt}: near-tie at step {step} (top-2 logits {margin:.1e} "
            "apart), which fp32 round-off could flip on another CPU; pick another prompt"
        )
        seq.append(int(top.indices[0]))
    return seq[len(prompt) :]


@torch.no_grad()
def model_logprobs(
    model: Glm4MoeForCausalLM, prompt: list[int], output: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """float32 [len(output)]: the trainer's recomputation (token_logprobs) at the outputs."""
    ids = torch.tensor(prompt + output)
    lp = model.token_logprobs(ids, torch.tensor([0, len(ids)]), temperature=temperature)
    return lp.logprobs[len(prompt) :]


async def wait_until(pred, timeout: float = 30.0, interval: float = 0.005) -> None:
    """Poll `pred()` from the event loop until true (no timing assertion: fails on timeout)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def slowed(engine, seconds: float = 0.004):
    """Make every forward of `engine`'s model `seconds` slower (it still runs for real), so
    that a control call made after a few tokens lands long before a request could finish."""
    model = engine.model
    forward = model.forward_cached

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward_cached = slow_forward
    try:
        yield
    finally:
        del model.forward_cached
