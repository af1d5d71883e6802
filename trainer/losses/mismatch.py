"""Rollout-trainer mismatch metrics split by finish reason and by staleness (as slime / verl
report them): per group of trainable tokens, the mean |old - rollout| logprob difference, the
k3 estimate of KL(rollout || trainer) and, with TIS on, the fraction of truncated weights.

Names: `<metric>/finish_<reason>` (stop, length, abort, error) and `<metric>/stale_<s>` with s
= the trainer's version when the step was built minus the token's version (0 = on-policy).
The unsplit means (`mismatch_abs_diff`, `mismatch_k3`, `tis_clip_frac`) stay as they are.
"""

from __future__ import annotations

from torch import Tensor

from trainer.backend import FINISH_REASONS, PackedBatch
from trainer.losses.stats import StatSums


def add_mismatch_splits(
    stats: StatSums, batch: PackedBatch, per_token: dict[str, Tensor], mask: Tensor
) -> None:
    """Accumulate every per_token metric [T] (name -> values) over mask > 0, per finish reason
    of the token's sequence (batch.finish_codes) and per staleness (batch.policy_version)."""
    for suffix, selector in _groups(batch, mask):
        stats.add_masked_means({f"{n}/{suffix}": v for n, v in per_token.items()}, selector)


def _groups(batch: PackedBatch, mask: Tensor) -> list[tuple[str, Tensor]]:
    trained = mask > 0
    groups: list[tuple[str, Tensor]] = []
    if batch.finish_codes is not None:
        codes = batch.finish_codes.to(mask.device)[batch.seq_ids]
        for code in codes[trained].unique().tolist():
            groups.append((f"finish_{FINISH_REASONS[code].value}", mask * (codes == code)))
    if batch.policy_version is not None:
        staleness = batch.policy_version - batch.versions
        generated = trained & (batch.versions >= 0)
        for s in staleness[generated].unique().tolist():
            groups.append((f"stale_{s}", mask * ((staleness == s) & generated)))
    return groups
