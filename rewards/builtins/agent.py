"""The `agent` reward: pass through what an OpenAI-client agent returned.

`rollout.agent_rollout` stores an agent's return value in the episode's metadata: a float in
``metadata["agent_reward"]``, a dict of rewards by name in ``metadata["agent_rewards"]``
(scored here as its components, summed; see `rewards.protocol.to_scalar`). Use
``{name: agent}`` in the reward list to train on it, alone or weighted with other plugins,
which can score the same finished episode from its tokens and metadata.
"""

from __future__ import annotations

from collections.abc import Mapping

from buffer.episode import Episode
from rewards.protocol import RewardInputError


def agent_reward(episode: Episode) -> float | Mapping[str, float]:
    """metadata["agent_rewards"] (a dict) or metadata["agent_reward"] (a float)."""
    rewards = episode.metadata.get("agent_rewards")
    if rewards:
        return dict(rewards)
    value = episode.metadata.get("agent_reward")
    if value is None:
        raise RewardInputError("metadata['agent_reward'] is missing: no agent ran this episode")
    return float(value)
