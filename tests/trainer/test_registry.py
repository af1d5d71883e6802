"""The one registry covers every name AlgorithmConfig accepts, and errors list valid names."""

from __future__ import annotations

import typing

import pytest

from configs.algorithm import AlgorithmConfig, KLConfig, TISConfig
from trainer.losses.registry import REGISTRY, lookup


def _literal_names(model, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


@pytest.mark.parametrize(
    ("kind", "model", "field"),
    [
        ("advantage", AlgorithmConfig, "advantage"),
        ("policy_loss", AlgorithmConfig, "policy_loss"),
        ("loss_agg", AlgorithmConfig, "loss_agg"),
        ("kl", KLConfig, "estimator"),
        ("importance", TISConfig, "mode"),
    ],
)
def test_registry_matches_config_literals(kind, model, field):
    assert set(REGISTRY[kind]) == _literal_names(model, field)
    for name in REGISTRY[kind]:
        assert callable(lookup(kind, name)) or hasattr(lookup(kind, name), "reduce")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="valid names: \\['dr_grpo', 'gae', 'grpo'"):
        lookup("advantage", "ppo")
    with pytest.raises(KeyError, match="valid kinds"):
        lookup("nope", "x")


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        REGISTRY["advantage"]["mine"] = None  # type: ignore[index]
