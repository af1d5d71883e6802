"""What one optimizer step of the torch backend reports: its loss statistics and expert load
combined over the data-parallel ranks, and the tokens it trained on.

Metric sums stay tensors until here; `step_metrics` turns them into floats once per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.backend import PackedBatch
from trainer.distributed import DataParallel
from trainer.losses.stats import StatSums
from trainer.moe_balance import expert_load_metrics


def reduce_stats(stats: StatSums, dp: DataParallel) -> None:
    """Sum (max, min) each metric over the ranks in place; a metric only some ranks hold
    (e.g. a split no micro-batch of a rank had) enters the others as its identity."""
    if dp.enabled:
        names: dict[str, set[str]] = {}
        for rank_names in dp.all_gather_object(stats.names()):
            for kind, values in rank_names.items():
                names.setdefault(kind, set()).update(values)
        mine = stats.names()
        stats.include({k: sorted(v - set(mine[k])) for k, v in names.items()})
    stats.all_reduce(dp.all_reduce)


def step_metrics(
    batches: list[PackedBatch], stats: StatSums, load: Tensor, dp: DataParallel, elapsed: float
) -> dict[str, float]:
    """Floats of a step whose stats and load [n_moe, E] are already reduced over the ranks:
    the statistics, expert load, episode tokens (a shared prompt once per sequence) and the
    tokens the model computed, summed over the ranks; tokens_per_s over `elapsed` seconds."""
    tokens = torch.tensor([[float(b.episode_tokens), float(b.num_tokens)] for b in batches])
    tokens = tokens.sum(0) if batches else torch.zeros(2)
    dp.all_reduce(tokens)
    episode_tokens, computed = tokens.tolist()
    metrics = stats.finalize() | expert_load_metrics(load)
    metrics |= {"tokens": episode_tokens, "tokens_per_s": episode_tokens / elapsed}
    metrics["computed_tokens"] = computed
    return metrics
