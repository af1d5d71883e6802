"""The README's ten-line plugin works exactly as written: resolved by import path, scored."""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
from pathlib import Path

import pytest

from rewards.composite import build_reward_fn
from rewards.registry import RewardSpec
from tests.rewards.conftest import episode_with

README = Path(__file__).resolve().parents[2] / "rewards" / "README.md"


def test_readme_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    plugin = next(b for b in blocks if b.startswith("# my_rewards.py"))
    assert len(plugin.strip().splitlines()) <= 11  # ten lines of code + the file-name comment
    (tmp_path / "my_rewards.py").write_text(plugin)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    episodes = [
        episode_with("95", label="95"),
        episode_with("95 is the answer, written out at length", label="95"),
        episode_with("59", label="95"),
    ]
    spec = RewardSpec("my_rewards:starts_with_label", args={"bonus": 0.1})
    with build_reward_fn([spec], timeout_s=10) as reward_fn:
        asyncio.run(reward_fn.score_group(episodes))
    assert [e.reward for e in episodes] == [pytest.approx(1.1), 1.0, 0.0]
    sys.modules.pop("my_rewards", None)
