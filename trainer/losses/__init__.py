"""The trainer's algorithms as pure torch functions, picked by name through one registry.

advantages.py   GRPO, Dr.GRPO, RLOO, REINFORCE++, GAE
policy.py       PPO clip (clip-higher, dual clip), GSPO, SFT cross-entropy
aggregation.py  token_mean, seq_mean_token_sum, seq_mean_token_mean
kl.py           k1, k2, k3 (loss or reward penalty)
importance.py   truncated importance sampling (truncate, icepop), rollout mismatch metrics
value.py        clipped value loss, entropy bonus
registry.py     REGISTRY / lookup(kind, name)
objective.py    ActorObjective / CriticObjective: the per-micro-batch loss every backend uses
stats.py        StatSums: metrics accumulated over micro-batches and ranks
"""

from trainer.losses.objective import ActorObjective, CriticObjective, StepTotals
from trainer.losses.registry import REGISTRY, lookup
from trainer.losses.stats import StatSums

__all__ = ["REGISTRY", "ActorObjective", "CriticObjective", "StatSums", "StepTotals", "lookup"]
