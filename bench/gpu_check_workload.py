"""What gpu_check runs: the model and workload sizes, and GRPO-shaped synthetic episode
groups for the train step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Size:
    """Model and workload sizes of one run."""

    model: dict[str, Any]
    decode_batch: int
    new_tokens: int
    train_prompts: int
    train_samples: int
    prompt_len: int
    response_len: int
    train_steps: int
    repeats: int


_SMALL_MODEL = dict(
    vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=4096,
    use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=32, n_shared_experts=1,
    num_experts_per_tok=4, routed_scaling_factor=1.0, norm_topk_prob=True,
    tie_word_embeddings=False,
)  # fmt: skip

SIZES: dict[str, Size] = {
    "small": Size(_SMALL_MODEL, 64, 128, 8, 8, 256, 256, 5, 3),
    "tiny": Size({}, 4, 8, 2, 4, 12, 8, 2, 1),  # the glm4moe-toy preset as it is
}


def synthetic_groups(
    n_prompts: int, n_samples: int, prompt_len: int, response_len: int, vocab: int, seed: int
) -> list[Any]:
    """GRPO-shaped episode groups of random tokens: one prompt per group, n responses of
    random length in [response_len/2, response_len], rewards 0/1 (never all equal)."""
    import numpy as np
    import torch

    from buffer.episode import Episode, EpisodeGroup

    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_prompts):
        prompt = torch.randint(1, vocab, (prompt_len,), generator=g).tolist()
        episodes = []
        for k in range(n_samples):
            n = int(torch.randint(max(response_len // 2, 1), response_len + 1, (1,), generator=g))
            episodes.append(
                Episode(
                    prompt_ids=prompt,
                    response_ids=torch.randint(1, vocab, (n,), generator=g).tolist(),
                    loss_mask=np.ones(n),
                    rollout_logprobs=np.zeros(n),
                    versions=np.zeros(n),
                    reward=float(k % 2),
                )
            )
        groups.append(EpisodeGroup(f"p{i}", episodes))
    return groups
