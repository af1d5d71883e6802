"""Chat rows to SFT episodes: the chat template renders them and masks the assistant's tokens.

A row is `{"messages": [...], "tools": [...]?, "label": str?, "id": str?}`. A row whose
conversation has no assistant turn but a `label` (the toy task rows: user "37+58=", label
"95") is completed with the assistant answer `label`. Each episode's response is everything
after the first assistant generation prompt, with loss mask 1 exactly on assistant-generated
tokens (models.chat.render_sft); rollout logprobs are 0 and versions -1 (no policy made them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from buffer.episode import NO_VERSION, Episode
from models.chat import render_sft


def sft_messages(row: Mapping[str, Any], where: str = "row") -> list[dict[str, Any]]:
    """The row's conversation, with an assistant turn `label` appended when it has none."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}.messages: expected a non-empty list of chat messages")
    if any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
        return list(messages)
    if row.get("label") is None:
        raise ValueError(f"{where}: no assistant turn and no 'label' to train on")
    return [*messages, {"role": "assistant", "content": str(row["label"])}]


def sft_episode(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], where: str = "row"
) -> Episode:
    """One SFT Episode from one chat row."""
    prompt, response, mask = render_sft(tokenizer, sft_messages(row, where), row.get("tools"))
    n = len(response)
    return Episode(
        prompt_ids=np.asarray(prompt),
        response_ids=np.asarray(response),
        loss_mask=np.asarray(mask),
        rollout_logprobs=np.zeros(n, np.float32),
        versions=np.full(n, NO_VERSION),
        metadata={k: row[k] for k in ("id", "task", "label") if k in row},
    )


def sft_episodes(
    tokenizer: PreTrainedTokenizerBase, rows: Iterable[Mapping[str, Any]]
) -> list[Episode]:
    """SFT Episodes of `rows`; errors name the row index."""
    return [sft_episode(tokenizer, row, f"rows[{i}]") for i, row in enumerate(rows)]
