"""The one registry of the trainer's algorithms: kind -> name -> implementation.

Kinds and the config field that names the entry:
  advantage    AlgorithmConfig.advantage      (AdvantageEstimator)
  policy_loss  AlgorithmConfig.policy_loss    (PolicyLoss)
  loss_agg     AlgorithmConfig.loss_agg       (Aggregator)
  kl           AlgorithmConfig.kl.estimator   (KLEstimator)
  importance   AlgorithmConfig.tis.mode       (ISMode)
Every backend resolves its functions here, once, when it is built; nothing picks an
implementation by comparing strings. The registry is read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from trainer.losses.advantages import ADVANTAGE_ESTIMATORS
from trainer.losses.aggregation import AGGREGATIONS
from trainer.losses.importance import IS_MODES
from trainer.losses.kl import KL_ESTIMATORS
from trainer.losses.policy import POLICY_LOSSES

REGISTRY: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "advantage": MappingProxyType(ADVANTAGE_ESTIMATORS),
        "policy_loss": MappingProxyType(POLICY_LOSSES),
        "loss_agg": MappingProxyType(AGGREGATIONS),
        "kl": MappingProxyType(KL_ESTIMATORS),
        "importance": MappingProxyType(IS_MODES),
    }
)


def lookup(kind: str, name: str) -> Any:
    """The implementation registered as `name` under `kind`; errors list the valid names."""
    try:
        table = REGISTRY[kind]
    except KeyError:
        raise KeyError(f"unknown registry kind {kind!r}; valid kinds: {sorted(REGISTRY)}") from None
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; valid names: {sorted(table)}") from None
