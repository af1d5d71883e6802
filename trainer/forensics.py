"""Mismatch forensics: the tokens whose trainer logprob differs most from the engine's.

After each RL step the trainer writes the `top` trainable tokens of its share by
|Δlogprob| = |trainer - rollout| to `run_dir/mismatch/step_<N>.jsonl` (rank r > 0:
`step_<N>.rank<r>.jsonl`), one JSON object per token, largest first. `physarum inspect`
reads them back and decodes them with the run's tokenizer. A record is small (ids, not text:
`context` tokens before the token, `after` tokens after it), so a step's file stays a few KiB.

Trainer logprobs are those of the logprob pass (`old_logprobs`, what the mismatch metrics
compare) or, without one, those of the training forward, which are the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.backend import FINISH_REASONS, PackedBatch

MISMATCH_DIR = "mismatch"


def mismatch_path(run_dir: Path, step: int, rank: int = 0) -> Path:
    """Where rank `rank` writes step `step`'s records."""
    name = f"step_{step}.jsonl" if rank == 0 else f"step_{step}.rank{rank}.jsonl"
    return Path(run_dir) / MISMATCH_DIR / name


def top_mismatch(
    batches: Sequence[PackedBatch], top: int, *, context: int = 24, after: int = 4
) -> list[dict[str, Any]]:
    """The `top` trainable tokens of `batches` with the largest |Δlogprob|, largest first.

    Each record: abs_diff, trainer_logprob, rollout_logprob, token_id, position (in the
    response), context_ids / after_ids (token ids around it), sample_index, prompt_len,
    response_len, version (the token's policy version), policy_version (the trainer's when the
    step was built), staleness, finish_reason, replayed (R3: its logprob ran on the engine's
    experts; None without R3), seq_abs_diff_mean / seq_abs_diff_max over the sequence.
    """
    candidates: list[tuple[float, int, int]] = []  # (abs diff, batch, token)
    views: list[_BatchView | None] = []
    for bi, b in enumerate(batches):
        trainer = b.old_logprobs if b.old_logprobs is not None else b.train_logprobs
        if trainer is None:
            views.append(None)
            continue
        diff = (trainer.float().cpu() - b.rollout_logprobs.float()).abs()
        diff = torch.where(b.loss_mask > 0, diff, torch.full_like(diff, -1.0))
        views.append(_BatchView(b, trainer, diff))
        values, index = diff.topk(min(top, diff.numel()))
        candidates += [(v, bi, i) for v, i in zip(values.tolist(), index.tolist()) if v >= 0]
    candidates.sort(key=lambda c: -c[0])
    records = []
    for _, bi, t in candidates[:top]:
        view = views[bi]
        assert view is not None  # only batches with logprobs have candidates
        records.append(view.record(t, context, after))
    return records


class _BatchView:
    """One batch's per-token tensors as numpy arrays, converted once: a record is then a few
    array lookups instead of ~20 tensor ops (32 records a step cost the trainer ~4 % of it)."""

    def __init__(self, b: PackedBatch, trainer: torch.Tensor, diff: torch.Tensor) -> None:
        self.batch = b
        self.diff = diff.numpy()
        self.trainer = trainer.detach().float().cpu().numpy()
        self.rollout = b.rollout_logprobs.float().cpu().numpy()
        self.mask = b.loss_mask.cpu().numpy()
        self.ids = b.input_ids.cpu().numpy()
        self.versions = b.versions.cpu().numpy()
        self.seq_ids = b.seq_ids.cpu().numpy()
        self.replayed = None if b.routing_replayed is None else b.routing_replayed.cpu().numpy()
        self.cu = b.cu_seqlens.cpu().numpy()
        # per-sequence columns as numpy too: indexing a tensor by an int costs ~5 us a read
        self.prompt_lens = _numpy(b.prompt_lens)
        self.sample_index = _numpy(b.sample_index)
        self.finish_codes = _numpy(b.finish_codes)
        layout = b.layout
        self.tree = (
            None
            if layout is None
            else tuple(t.cpu().numpy() for t in (layout.cu_rows, layout.branch, layout.positions))
        )

    def episode_index(self, seq: int) -> np.ndarray:
        """PackedBatch.episode_index in numpy (a few array lookups, not tensor ops)."""
        start, end = int(self.cu[seq]), int(self.cu[seq + 1])
        own = np.arange(start, end)
        if self.tree is None or self.tree[1][start] == 0:
            return own
        cu_rows, _, positions = self.tree
        row_start = int(cu_rows[np.searchsorted(cu_rows, start, side="right") - 1])
        return np.concatenate([np.arange(row_start, row_start + int(positions[start])), own])

    def record(self, t: int, context: int, after: int) -> dict[str, Any]:
        b = self.batch
        seq = int(self.seq_ids[t])
        index = self.episode_index(seq)  # the sequence's tokens in order (a shared prompt too)
        at = int(np.flatnonzero(index == t)[0])
        prompt_len = int(self.prompt_lens[seq]) if self.prompt_lens is not None else 0
        seq_diff = self.diff[index]
        seq_diff = seq_diff[(self.mask[index] > 0) & (seq_diff >= 0)]
        version = int(self.versions[t])
        ids = self.ids[index]
        return {
            "abs_diff": float(self.diff[t]),
            "trainer_logprob": float(self.trainer[t]),
            "rollout_logprob": float(self.rollout[t]),
            "token_id": int(ids[at]),
            "position": at - prompt_len,
            "context_ids": ids[max(0, at - context) : at].tolist(),
            "after_ids": ids[at + 1 : at + 1 + after].tolist(),
            "sample_index": int(self.sample_index[seq]) if self.sample_index is not None else seq,
            "prompt_len": prompt_len,
            "response_len": len(index) - prompt_len,
            "version": version,
            "policy_version": b.policy_version,
            "staleness": None if b.policy_version is None else b.policy_version - version,
            "finish_reason": (
                FINISH_REASONS[int(self.finish_codes[seq])].value
                if self.finish_codes is not None
                else None
            ),
            "replayed": None if self.replayed is None else bool(self.replayed[t]),
            "seq_abs_diff_mean": float(seq_diff.mean()) if seq_diff.size else 0.0,
            "seq_abs_diff_max": float(seq_diff.max()) if seq_diff.size else 0.0,
        }


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.cpu().numpy()


def write_mismatch(path: Path, records: list[dict[str, Any]]) -> None:
    """Write the records as JSONL (replacing an older file of the same step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
