"""The torch side of the megatron parity tests: model, batches, episodes, one training step.

Imported by the scenarios (scenarios.py) inside torchrun workers, after the CPU shim. The
reference is our torch GLM-4.x model (models.Glm4MoeForCausalLM) trained with
torch.optim.AdamW, global grad-norm clipping and the loss-free expert-bias update written out
here from its definition (bias_i += rate * sign(mean load - load_i)), on the same batches and
the same shared ActorObjective the megatron backend uses.
"""

from __future__ import annotations

import numpy as np
import torch

from buffer.episode import Episode, EpisodeGroup
from configs.algorithm import AlgorithmConfig, KLConfig, MoEConfig, TISConfig
from models import Glm4MoeForCausalLM, get_preset
from trainer.backend import PackedBatch
from trainer.losses import ActorObjective, StepTotals

LR = 1e-3
TEMPERATURE = 0.9
SEQ_LENS = [[9, 6, 11], [7, 12], [5, 8, 6]]  # three micro-batches of packed sequences


def build_model(untied: bool, **overrides) -> Glm4MoeForCausalLM:
    """glm4moe-tiny with 4 layers (1 dense), QKV bias, scaling 2.5; weights far from init."""
    config = get_preset(
        "glm4moe-tiny",
        num_hidden_layers=4,
        attention_bias=True,
        routed_scaling_factor=2.5,
        tie_word_embeddings=not untied,
        initializer_range=0.08,
        **overrides,
    )
    torch.manual_seed(1234)
    model = Glm4MoeForCausalLM(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.uniform_(0.7, 1.3)
            elif name.endswith("bias"):
                tensor.normal_(0.0, 0.05)
        for block in model.moe_blocks():
            block.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def algorithm() -> AlgorithmConfig:
    """PPO clip with TIS, a k3 KL loss against ref logprobs and an entropy bonus."""
    return AlgorithmConfig(
        policy_loss="ppo_clip",
        loss_agg="token_mean",
        entropy_coef=0.01,
        kl=KLConfig(coef=0.1, estimator="k3", mode="loss"),
        tis=TISConfig(enabled=True, low=0.0, high=2.0),
        moe=MoEConfig(bias_update_rate=1e-3),
    )


def make_batches(model: Glm4MoeForCausalLM) -> list[PackedBatch]:
    """Packed micro-batches with rollout/old/ref logprobs near the model's own."""
    gen = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    batches = []
    for lens in SEQ_LENS:
        total = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        ids = torch.randint(0, vocab, (total,), generator=gen)
        seq_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        mask = torch.zeros(total)
        for start, length in zip(cu[:-1].tolist(), lens):
            mask[start + length // 2 : start + length] = 1.0
        with torch.no_grad():
            own = model.token_logprobs(ids, cu, temperature=TEMPERATURE).logprobs

        noise = torch.randn(3, total, generator=gen) * torch.tensor([[0.2], [0.3], [0.1]])
        rollout, old, ref = ((own + n) * mask for n in noise)
        batches.append(
            PackedBatch(
                input_ids=ids,
                cu_seqlens=cu,
                loss_mask=mask,
                rollout_logprobs=rollout,
                advantages=torch.randn(len(lens), generator=gen)[seq_ids] * mask,
                versions=torch.where(mask > 0, 0, -1),
                seq_ids=seq_ids,
                temperature=TEMPERATURE,
                old_logprobs=old,
                ref_logprobs=ref,
            )
        )
    return batches


def torch_logprobs(model: Glm4MoeForCausalLM, batches: list[PackedBatch]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model.token_logprobs(b.input_ids, b.cu_seqlens, temperature=b.temperature).logprobs
            for b in batches
        ]


def torch_step(
    model: Glm4MoeForCausalLM, batches: list[PackedBatch], objective: ActorObjective
) -> float:
    """One reference optimizer step; returns the step loss (sum of the objective's shares)."""
    totals = StepTotals(
        agg=sum(objective.count(b) for b in batches),
        tokens=torch.tensor(float(sum(b.num_tokens for b in batches))),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    total_loss, load = 0.0, 0.0
    for batch in batches:
        out = model.token_logprobs(
            batch.input_ids, batch.cu_seqlens, temperature=batch.temperature, with_entropy=True
        )
        loss, _ = objective(batch, out.logprobs, totals, entropy=out.entropy)
        loss.backward()
        total_loss += float(loss)
        load = load + out.expert_load
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        for block, layer_load in zip(model.moe_blocks(), load):
            bias = block.gate.e_score_correction_bias
            bias += 1e-3 * torch.sign(layer_load.mean() - layer_load)
    return total_loss


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def episode_groups(vocab: int, n_groups: int, seed: int) -> list[EpisodeGroup]:
    """Rollout-like groups of 4 samples with random tokens and 0/1 rewards."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        prompt = rng.integers(0, vocab, int(rng.integers(4, 9)))
        episodes = []
        for _ in range(4):
            n = int(rng.integers(3, 8))
            episodes.append(
                Episode(
                    prompt_ids=prompt,
                    response_ids=rng.integers(0, vocab, n),
                    loss_mask=np.ones(n),
                    rollout_logprobs=-rng.uniform(1.0, 6.0, n),
                    versions=np.zeros(n),
                    reward=float(rng.integers(0, 2)),
                )
            )
        groups.append(EpisodeGroup(f"p{seed}-{g}", episodes))
    return groups
