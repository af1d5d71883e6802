"""The trainer backend contract: the packed micro-batch and the protocol every backend implements.

A step's sequences are packed into micro-batches (`PackedBatch`): B sequences concatenated into
T tokens, with every per-token tensor aligned to `input_ids`. The torch backend
(`trainer/torch_backend.py`) and the Megatron backend (`trainer/megatron/`) both consume these,
and both compute their losses through the shared registry in `trainer/losses/`.

Per-token alignment (the same as the model's `token_logprobs`): position t of a [T] tensor
refers to token `input_ids[t]`; a logprob at t is log p(input_ids[t] | the tokens before it in
its sequence), 0 at the first token of every sequence. A critic value at t is the value of the
state *before* token t (the prefix that predicts it), also 0 at the first token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from buffer.episode import FinishReason
from models.batching import TreeLayout

FINISH_REASONS: tuple[FinishReason, ...] = tuple(FinishReason)
"""PackedBatch.finish_codes index -> finish reason."""

_PER_TOKEN = (
    "input_ids",
    "loss_mask",
    "rollout_logprobs",
    "advantages",
    "returns",
    "old_logprobs",
    "ref_logprobs",
    "values",
    "versions",
    "seq_ids",
    "routing_replayed",
)


@dataclass
class PackedBatch:
    """One micro-batch of B packed sequences (T tokens); all [T] tensors aligned per token.

    input_ids         int64   [T]    prompt + response tokens of the B sequences, concatenated
    cu_seqlens        int64   [B+1]  sequence boundaries: sequence b is [cu[b], cu[b+1])
    loss_mask         float32 [T]    1 on trainable response tokens (Episode.loss_mask), else 0
    rollout_logprobs  float32 [T]    engine logprobs at response tokens, 0 elsewhere
    advantages        float32 [T]    per-token advantage (0 where loss_mask is 0)
    returns           float32 [T] | None  critic targets (PPO with GAE)
    old_logprobs      float32 [T] | None  policy logprobs before the update (the logprob pass)
    ref_logprobs      float32 [T] | None  frozen reference logprobs (KL)
    values            float32 [T] | None  critic values before the update (value clipping)
    versions          int64   [T]    policy version of each token; -1 where not generated
    seq_ids           int64   [T]    which sequence (0..B-1) each token belongs to
    temperature       float          sampling temperature the logprobs are taken at
    sample_index      int64   [B]    index of each sequence in the step's sequence list
    prompt_lens       int64   [B]    prompt length of each sequence (response starts after)
    routed_experts    int64   [n_moe, T, k] | None  experts to replay: R3 the engine's (-1 =
                                     the router's own) from build_step, then the experts the
                                     logprob pass used (R2 and R3); training replays them
    routing_replayed  bool    [T] | None  R3: the position before the token ran on the
                                     engine's experts (its logprob used replayed routing)
    train_logprobs    float32 [T] | None  set by train_step: its forward's detached logprobs
    finish_codes      int64   [B] | None  each sequence's finish reason (FINISH_REASONS index)
    policy_version    int | None     the trainer's version the step was built at (a token's
                                     staleness is policy_version - versions)
    layout            TreeLayout | None  shared prompt prefixes (trainer.share_prompt_prefix):
                                     the model's rows, positions, tree mask and predictors.
                                     Sequence b then owns [cu[b], cu[b+1]) with a tree's
                                     prompt owned by its first sequence (seq_ids likewise);
                                     every other sequence of the tree sees it through the mask
    """

    input_ids: Tensor
    cu_seqlens: Tensor
    loss_mask: Tensor
    rollout_logprobs: Tensor
    advantages: Tensor
    versions: Tensor
    seq_ids: Tensor
    temperature: float = 1.0
    returns: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    sample_index: Tensor | None = None
    prompt_lens: Tensor | None = None
    routed_experts: Tensor | None = None
    finish_codes: Tensor | None = None
    policy_version: int | None = None
    routing_replayed: Tensor | None = None
    train_logprobs: Tensor | None = None
    layout: TreeLayout | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def positions(self) -> Tensor:
        """int64 [T]: each token's position in its own sequence (prompt 0.., response P..)."""
        if self.layout is not None:
            return self.layout.positions
        cu = self.cu_seqlens
        return torch.arange(self.num_tokens, device=cu.device) - cu[self.seq_ids.to(cu.device)]

    @property
    def predictor(self) -> Tensor:
        """int64 [T]: index of the token whose hidden state predicts token t, -1 at the first
        token of a sequence (t - 1 elsewhere, unless the layout shares prompts)."""
        if self.layout is not None:
            return self.layout.predictor
        pred = torch.arange(-1, self.num_tokens - 1, device=self.input_ids.device)
        pred[self.cu_seqlens[:-1].to(pred.device)] = -1
        return pred

    @property
    def episode_tokens(self) -> int:
        """Tokens of the B sequences as episodes (a shared prompt counted once per sequence);
        num_tokens is what the model computes."""
        if self.layout is None:
            return self.num_tokens
        return int(self.layout.multiplicity.sum())

    def episode_index(self, seq: int) -> Tensor:
        """int64: the pack positions of sequence `seq`'s tokens in order (prompt, response),
        a shared prompt included."""
        start, end = int(self.cu_seqlens[seq]), int(self.cu_seqlens[seq + 1])
        own = torch.arange(start, end)
        if self.layout is None or int(self.layout.branch[start]) == 0:
            return own
        row = int(torch.searchsorted(self.layout.cu_rows, torch.tensor(start), right=True)) - 1
        row_start = int(self.layout.cu_rows[row])
        prompt = torch.arange(row_start, row_start + int(self.layout.positions[start]))
        return torch.cat([prompt, own])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def validate(self) -> None:
        """Raise ValueError naming the first field whose shape does not match input_ids."""
        t = self.num_tokens
        if self.input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected shape [T], got {tuple(self.input_ids.shape)}")
        if int(self.cu_seqlens[-1]) != t or int(self.cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens: must run from 0 to T={t}, got {self.cu_seqlens}")
        for name in _PER_TOKEN:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (t,):
                raise ValueError(f"{name}: expected shape ({t},), got {tuple(value.shape)}")
        for name in ("sample_index", "prompt_lens", "finish_codes"):
            value = getattr(self, name)
            if value is not None and value.numel() != self.num_seqs:
                raise ValueError(f"{name}: expected {self.num_seqs} entries, got {value.numel()}")
        if self.layout is not None:
            for name in ("positions", "branch", "predictor", "multiplicity"):
                value = getattr(self.layout, name)
                if tuple(value.shape) != (t,):
                    raise ValueError(
                        f"layout.{name}: expected shape ({t},), got {tuple(value.shape)}"
                    )

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor moved to `device`."""
        moved = {
            f.name: (
                v.to(device) if isinstance(v := getattr(self, f.name), Tensor | TreeLayout) else v
            )
            for f in fields(self)
        }
        return replace(self, **moved)


@runtime_checkable
class TrainerBackend(Protocol):
    """What the job driver needs from a training backend (torch or Megatron)."""

    version: int
    """Policy version: optimizer steps taken (the version stamped on exported weights)."""

    def logprobs(self, batches: list[PackedBatch], *, model: str = "actor") -> list[Tensor]:
        """No-grad per-token logprobs float32 [T] per batch; model "actor" | "ref"."""
        ...

    def train_step(self, batches: list[PackedBatch]) -> dict[str, float]:
        """One optimizer step over these micro-batches (gradient accumulation); metrics."""
        ...

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full tensors with Hugging Face on-disk names."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...
