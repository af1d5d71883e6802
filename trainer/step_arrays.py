"""A step's episodes as flat arrays, so a micro-batch is a few gathers instead of per-episode work.

`build_step` used to make each micro-batch by looping over its episodes (a mask, a zeros and a
full per prompt and response, then concatenations): ~1.2 ms of the trainer's CPU a step for
the e2e job's 64 short episodes. Here the step's episodes are concatenated once, each as
[prompt, response] (the unshared layout), with every per-token column the PackedBatch needs
(ids, loss mask after the staleness and overlong masks, rollout logprobs, versions); a
micro-batch of episodes `indices` is then one index array over them (`gather_index`). Same
numbers as the per-episode construction (tests/trainer/test_step_arrays.py keeps it, with the
mask rule per episode, and checks the whole StepBatch against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from buffer.episode import Episode, FinishReason


def cumsum0(lengths: np.ndarray) -> np.ndarray:
    """int64 [n + 1]: 0, then the running sums of `lengths`."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64 [sum lengths]: starts[0] + 0.., then starts[1] + 0.., ... (concatenated aranges)."""
    total = int(lengths.sum())
    offsets = cumsum0(lengths)[:-1]
    return np.repeat(np.asarray(starts, np.int64) - offsets, lengths) + np.arange(total)


@dataclass(frozen=True)
class StepArrays:
    """n episodes concatenated as [prompt_0, response_0, prompt_1, ...].

    ids          int64   [S]  token ids
    loss_mask    float32 [S]  0 on prompts; the episode's mask on responses, 0 on stale tokens
                              (versions below current_version - max_staleness) and on every
                              token of an overlong ("length") episode with mask_truncated
    logprobs     float32 [S]  rollout logprobs on responses, 0 on prompts
    versions     int64   [S]  policy version of response tokens, -1 on prompts
    starts       int64   [n]  where episode i starts
    lengths      int64   [n]  its tokens (prompt + response)
    prompt_lens  int64   [n]
    """

    ids: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    prompt_lens: np.ndarray

    def gather_index(self, indices: Sequence[int]) -> np.ndarray:
        """int64 [T]: the tokens of episodes `indices`, in that order (their unshared pack)."""
        index = np.asarray(indices, np.int64)
        return ranges(self.starts[index], self.lengths[index])


def step_arrays(
    episodes: Sequence[Episode],
    current_version: int | None,
    max_staleness: int | None,
    mask_truncated: bool,
) -> StepArrays:
    """The step's episodes as StepArrays (masks as StepArrays.loss_mask says)."""
    n = len(episodes)
    prompt_lens = np.fromiter((len(e.prompt_ids) for e in episodes), np.int64, n)
    response_lens = np.fromiter((len(e.response_ids) for e in episodes), np.int64, n)
    lengths = prompt_lens + response_lens
    starts = cumsum0(lengths)[:-1]
    prompt_at = ranges(starts, prompt_lens)
    response_at = ranges(starts + prompt_lens, response_lens)
    total = int(lengths.sum())

    ids = np.empty(total, np.int64)
    ids[prompt_at] = _cat([e.prompt_ids for e in episodes], np.int64)
    ids[response_at] = _cat([e.response_ids for e in episodes], np.int64)
    response_versions = _cat([e.versions for e in episodes], np.int64)
    mask = _cat([e.loss_mask for e in episodes], np.float32)
    if mask_truncated:
        truncated = [e.finish_reason is FinishReason.LENGTH for e in episodes]
        mask[np.repeat(np.array(truncated, bool), response_lens)] = 0.0
    if current_version is not None and max_staleness is not None:
        oldest_ok = current_version - max_staleness
        mask[(response_versions >= 0) & (response_versions < oldest_ok)] = 0.0
    loss_mask = np.zeros(total, np.float32)
    loss_mask[response_at] = mask
    logprobs = np.zeros(total, np.float32)
    logprobs[response_at] = _cat([e.rollout_logprobs for e in episodes], np.float32)
    versions = np.full(total, -1, np.int64)
    versions[response_at] = response_versions
    return StepArrays(ids, loss_mask, logprobs, versions, starts, lengths, prompt_lens)


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """The parts concatenated as `dtype` (a new array: safe to write)."""
    return np.concatenate(parts).astype(dtype, copy=False)
