"""The `env` reward: pass through the reward a multi-turn environment gave at its last step.

`rollout.multiturn.run_episode` stores the final `StepResult.reward` in
``metadata["env_reward"]`` (when the environment returned one). Use ``{name: env}`` in the
reward list to train on it, alone or summed with other plugins. An episode whose environment
gave no reward (e.g. it stopped on max turns) gets `default` (0.0 unless configured; set
``default: null`` to make such episodes errors instead).
"""

from __future__ import annotations

from buffer.episode import Episode
from rewards.protocol import RewardInputError


def env_reward(episode: Episode, *, default: float | None = 0.0) -> float:
    """metadata["env_reward"], or `default` when the environment gave none."""
    value = episode.metadata.get("env_reward")
    if value is None:
        if default is None:
            raise RewardInputError("metadata['env_reward'] is missing: the env gave no reward")
        return float(default)
    return float(value)
