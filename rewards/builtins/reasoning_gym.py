"""reasoning-gym's own scorer as a reward: ``reward.plugins: [{name: reasoning_gym}]``.

For rows of ``data.task: reasoning_gym:<dataset>`` (`envs.tasks.reasoning_gym`). The answer
is the text inside the last ``<answer>...</answer>`` of the final model turn, as
reasoning-gym's own evaluations extract it, or the whole stripped turn when it has no such
tag (a toy model's direct answer). The dataset's ``score_answer(answer, entry)`` scores it
against the row's label and the entry metadata the row carried, so partial credit and
equivalent answers follow each dataset's own rules (scores in [0, 1]).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from buffer.episode import Episode
from rewards.protocol import RewardInputError, final_text, label

_ANSWER = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def extract_answer(text: str) -> str:
    """The last ``<answer>`` tag's content, else the whole text; stripped either way."""
    matches = _ANSWER.findall(text)
    return (matches[-1] if matches else text).strip()


@functools.lru_cache(maxsize=64)
def _scorer(dataset: str) -> Callable[[str | None, dict[str, Any]], float]:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise RewardInputError(
            f"reward 'reasoning_gym': reasoning-gym is not installed ({exc}); "
            "install the extra: pip install 'physarum-rl[envs]'"
        ) from None
    try:
        return reasoning_gym.get_score_answer_fn(dataset)
    except ValueError:
        raise RewardInputError(
            f"metadata['reasoning_gym']['dataset'] = {dataset!r} is not a reasoning-gym dataset"
        ) from None


def reasoning_gym_reward(episode: Episode) -> float:
    """The dataset's own score of the episode's answer; needs a reasoning_gym task row."""
    info = episode.metadata.get("reasoning_gym")
    if not isinstance(info, dict) or not isinstance(info.get("dataset"), str):
        raise RewardInputError(
            "metadata['reasoning_gym'] is missing: the reasoning_gym reward scores rows of "
            "data.task 'reasoning_gym:<dataset>'"
        )
    entry = {"answer": label(episode), "metadata": info.get("metadata") or {}}
    return float(_scorer(info["dataset"])(extract_answer(final_text(episode)), entry))
