"""Embedded-only rollout settings are refused for SGLang before anything launches."""

from __future__ import annotations

from pathlib import Path

import pytest

import configs
from configs import load_job
from rollout.worker import ENGINES

PRESET = Path(configs.__file__).parent / "toy_grpo.yaml"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rollout.fold_prefill_tokens=64", "rollout.fold_prefill_tokens"),
        ("rollout.partial_rollout=false", "rollout.partial_rollout"),
    ],
)
def test_sglang_refuses_embedded_only_settings(override: str, field: str) -> None:
    job = load_job(PRESET, ["rollout.engine=sglang", override])
    with pytest.raises(ValueError, match=field):
        ENGINES["sglang"](job, Path("unused"), None, Path("unused"), "rollout-0")
