"""Tasks from reasoning-gym by name: ``data.task: reasoning_gym:<dataset>``.

reasoning-gym (the optional extra ``physarum[envs]``) holds ~100 procedural generators
(``leg_counting``, ``basic_arithmetic``, ``chain_sum``, ...), each with its own scorer. Here
each becomes a `TaskSpec`, so it gets what a built-in task gets: seeded rows, the held-out
split by problem hash, demonstrations, tokenizer text. A row keeps what the dataset's scorer
needs: ``label`` is the entry's answer and ``metadata["reasoning_gym"]`` holds the dataset
name and the entry's own metadata; the ``reasoning_gym`` reward
(`rewards.builtins.reasoning_gym`) scores with the dataset's ``score_answer``.

``data.task_args`` are the dataset's config fields (e.g. ``{max_animals: 4}`` for
leg_counting), plus ``system_prompt``: none by default (a toy model's context is short), or
one of reasoning-gym's prompt names (``default``, ``simple``, ``direct``, ...) or any text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from typing import Any

from pydantic import ConfigDict

from envs.tasks.base import Problem, TaskParams, TaskSpec, label_as_answer

FAMILY = "reasoning_gym"
_INDEX_RANGE = 2**31  # entries are drawn by index; reasoning-gym seeds each index on its own


class ReasoningGymParams(TaskParams):
    """``system_prompt`` plus the dataset's own config fields (checked by reasoning-gym)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    system_prompt: str | None = None


def _registry() -> dict[str, Any]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise ValueError(
            f"task '{FAMILY}:...': reasoning-gym is not installed ({exc}); "
            "install the extra: pip install 'physarum-rl[envs]'"
        ) from None
    return DATASETS


def dataset_names() -> list[str]:
    """The reasoning-gym datasets installed, by name."""
    return sorted(_registry())


@functools.lru_cache(maxsize=32)
def _dataset(name: str, config_json: str) -> Any:
    """One reasoning-gym dataset object per (name, config); building some reads word lists."""
    import reasoning_gym

    config = json.loads(config_json)
    try:
        return reasoning_gym.create_dataset(name, seed=0, size=_INDEX_RANGE, **config)
    except (TypeError, ValueError, AssertionError) as exc:
        fields = [f.name for f in dataclasses.fields(_registry()[name][1])]
        raise ValueError(
            f"data.task_args for {FAMILY}:{name}: {exc}; the dataset's config fields are "
            f"{[f for f in fields if f not in ('seed', 'size')]} (plus system_prompt)"
        ) from None


def _system_prompt(text: str | None) -> str | None:
    if text is None:
        return None
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS.get(text, text)


def _sampler(name: str):
    def sample(rng: random.Random, params: ReasoningGymParams) -> Problem:
        config = dict(params.model_extra or {})
        dataset = _dataset(name, json.dumps(config, sort_keys=True))
        entry = dataset[rng.randrange(_INDEX_RANGE)]
        messages = [{"role": "user", "content": entry["question"]}]
        system = _system_prompt(params.system_prompt)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        metadata = {FAMILY: {"dataset": name, "metadata": entry.get("metadata", {})}}
        try:  # rows are JSONL: an entry that cannot be written cannot be scored later either
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"task '{FAMILY}:{name}': an entry's metadata is not JSON ({exc})"
            ) from None
        return Problem(
            key=entry["question"],
            messages=messages,
            label=str(entry["answer"]),
            metadata=metadata,
        )

    return sample


def reasoning_gym_task(dataset: str) -> TaskSpec:
    """The TaskSpec of reasoning-gym's `dataset`; ValueError listing the valid ones if unknown."""
    names = _registry()
    if dataset not in names:
        raise ValueError(
            f"unknown reasoning-gym dataset {dataset!r} (task '{FAMILY}:{dataset}'); "
            f"installed datasets: {', '.join(sorted(names))}"
        )
    return TaskSpec(
        name=f"{FAMILY}:{dataset}",
        description=f"reasoning-gym's {dataset} (params: its config fields, system_prompt)",
        params=ReasoningGymParams,
        sample=_sampler(dataset),
        demonstrate=label_as_answer,
    )
