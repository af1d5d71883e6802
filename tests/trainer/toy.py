"""Shared set-up of the trainer's toy-model tests (also imported by their subprocess workers).

Everything is deterministic: the toy tokenizer (trained on the toy tasks' corpus), the toy
GLM-4-MoE model (seeded init), and hand-made rollouts of the arithmetic task whose rewards
say whether the response is the right sum.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from buffer.episode import Episode, EpisodeGroup
from configs import AlgorithmConfig, TrainerConfig
from envs.tasks import make_rows, tokenizer_corpus
from models import Glm4MoeForCausalLM, get_preset
from models.chat import prompt_ids
from models.tokenizer import build_toy_tokenizer, load_tokenizer
from trainer.batch import StepBatch, build_rl_step
from trainer.torch_backend import TorchBackend


def make_tokenizer(directory: str | Path):
    """The toy tokenizer saved in `directory` (built there unless it already is)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    return build_toy_tokenizer(directory, tokenizer_corpus(500))


def toy_model(vocab_size: int, seed: int = 0, preset: str = "glm4moe-toy") -> Glm4MoeForCausalLM:
    """The toy model with a seeded random init."""
    model = Glm4MoeForCausalLM(get_preset(preset, vocab_size=vocab_size))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def arithmetic_groups(tokenizer, n_prompts: int, n_samples: int, seed: int) -> list[EpisodeGroup]:
    """Rollout-like groups: per prompt, n responses (right or off-by-some sums) + rewards."""
    rng = random.Random(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    groups = []
    for row in make_rows("arithmetic", n_prompts, seed=seed, split="train"):
        prompt = prompt_ids(tokenizer, row["messages"])
        episodes = []
        for k in range(n_samples):
            answer = int(row["label"]) + (0 if k % 2 == 0 else rng.randint(1, 9))
            response = tokenizer("\n" + str(answer), add_special_tokens=False)["input_ids"]
            response = [*response, eos]
            n = len(response)
            episodes.append(
                Episode(
                    prompt_ids=prompt,
                    response_ids=response,
                    loss_mask=np.ones(n),
                    rollout_logprobs=np.zeros(n),
                    versions=np.zeros(n),
                    reward=float(str(answer) == row["label"]),
                )
            )
        groups.append(EpisodeGroup(row["id"], episodes))
    return groups


def grpo_step(tokenizer, n_prompts: int = 8, n_samples: int = 8, seed: int = 0, **kw) -> StepBatch:
    groups = arithmetic_groups(tokenizer, n_prompts, n_samples, seed)
    return build_rl_step(groups, micro_batch_tokens=kw.pop("micro_batch_tokens", 4096), **kw)


def set_rollout_logprobs(backend: TorchBackend, step: StepBatch) -> None:
    """Pretend a perfect engine sampled the step: rollout logprobs = the actor's logprobs."""
    for batch, logp in zip(step.micro_batches, backend.logprobs(step.micro_batches), strict=True):
        batch.rollout_logprobs = logp * batch.loss_mask


def backend(
    model: Glm4MoeForCausalLM, trainer: dict | None = None, algo: dict | None = None, **kw
) -> TorchBackend:
    """A TorchBackend with config sections built from plain dicts."""
    cfg = TrainerConfig(**({"lr": 1e-3, "steps": 10} | (trainer or {})))
    return TorchBackend(model, cfg, AlgorithmConfig(**(algo or {})), **kw)
