"""Stop a job that trains on nothing: a step whose episodes are mostly errors, or none at all.

A reward plugin that fails on every episode (a list-valued label, a hung plugin) used to give
loss 0 step after step and exit 0. The driver checks each RL step's metrics instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from physarum.errors import UserError


class TrainingOnNothingError(UserError):
    """A step had no valid episode, or more errors than reward.max_error_fraction allows."""


def check_step(
    step: int, metrics: Mapping[str, float], max_error_fraction: float, *, unit: str = "step"
) -> None:
    """Raise TrainingOnNothingError when step `step`'s episodes are mostly errors.

    metrics: the trainer's step metrics, with "data/episodes" and "data/error_episodes".
    unit: what `step` counts in the message ("step", or "rejection sampling round").
    """
    episodes = int(metrics.get("data/episodes", 0))
    errors = int(metrics.get("data/error_episodes", 0))
    if episodes == 0:
        raise TrainingOnNothingError(
            f"{unit} {step}: trained on zero episodes; no valid episode group arrived "
            "(check the dataset and the rollout workers' logs)"
        )
    if errors / episodes > max_error_fraction:
        raise TrainingOnNothingError(
            f"{unit} {step}: {errors} of {episodes} episodes ({errors / episodes:.0%}) are errors, "
            f"above reward.max_error_fraction = {max_error_fraction:g}; the rollout workers' "
            "log names each failure (a reward plugin that raises or times out, a failed "
            "generation or environment). Stopping rather than training on nothing."
        )
