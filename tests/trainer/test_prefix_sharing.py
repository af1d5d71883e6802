"""trainer.share_prompt_prefix: prompt trees give the unshared step's numbers, with fewer tokens.

Parity: the same step (several groups with ragged completions, a group whose prompts differ,
a tree split by a small budget) with sharing on and off gives the same loss, per-token
logprobs and parameter gradients (fp32, ~1e-5), for each loss aggregation, with and without
the KL reference pass. The tree mask: a completion never sees another completion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from buffer.episode import Episode, EpisodeGroup
from configs.loader import load_job
from models.chat import prompt_ids
from tests.trainer.toy import arithmetic_groups, backend, toy_model
from trainer.batch import build_rl_step, to_padded
from trainer.forensics import top_mismatch
from trainer.prefix_tree import fallback_reason, plan_rows

ATOL = 2e-5


def _noisy(group: EpisodeGroup, rng: np.random.Generator) -> EpisodeGroup:
    """The group with ragged responses (cut at random), random engine logprobs, a masked-out
    token here and there, and random engine experts (R3) on the responses."""
    episodes = []
    for e in group.episodes:
        n = int(rng.integers(1, len(e.response_ids) + 1))
        mask = (rng.random(n) > 0.15).astype(np.float32)
        logp = -rng.random(n).astype(np.float32)
        experts = np.sort(np.argsort(rng.random((n, 3, 8)), axis=-1)[..., :2], axis=-1)
        episode = Episode(e.prompt_ids, e.response_ids[:n], mask, logp, np.zeros(n), e.reward)
        episode.routed_experts = experts.astype(np.uint8)  # toy: 3 MoE layers, top-2 of 8
        episode.routing_start = len(e.prompt_ids)
        episodes.append(episode)
    return EpisodeGroup(group.prompt_id, episodes)


def _mixed_group(tok) -> EpisodeGroup:
    """A group whose episodes' prompts differ (as some agent episodes): never a tree."""
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    episodes = []
    for text, answer, reward in [("3+4=", "7", 1.0), ("3+5=", "9", 0.0), ("3+4=", "12", 0.0)]:
        prompt = prompt_ids(tok, [{"role": "user", "content": text}])
        response = [*tok("\n" + answer, add_special_tokens=False)["input_ids"], eos]
        n = len(response)
        episodes.append(Episode(prompt, response, np.ones(n), np.zeros(n), np.zeros(n), reward))
    return EpisodeGroup("mixed", episodes)


@pytest.fixture(scope="module")
def groups(toy_tokenizer):
    rng = np.random.default_rng(0)
    base = arithmetic_groups(toy_tokenizer, 3, 5, seed=3) + [_mixed_group(toy_tokenizer)]
    return [_noisy(g, rng) for g in base]


def _step(groups, share: bool, budget: int, r3: bool = False):
    return build_rl_step(
        groups, micro_batch_tokens=budget, share_prompt_prefix=share, rollout_routing=r3
    )


def _run(tok, groups, share: bool, algo: dict, budget: int = 4096, trainer: dict | None = None):
    """(step, padded logprobs [N, L], loss metrics, {param: grad}, expert load) of one actor
    pass after the step's logprob passes and advantages."""
    torch.manual_seed(0)
    tb = backend(toy_model(len(tok), seed=1), {"lr": 1e-4} | (trainer or {}), algo)
    if tb.lora is not None:  # adapters that are not the identity: B = 0 at init
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in tb.lora.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if tb.ref is not None:  # a reference that differs from the actor: the KL term matters
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in tb.ref.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    step = _step(groups, share, budget, r3=algo.get("moe", {}).get("routing_replay") == "rollout")
    batches = tb.prepare(step)
    logp = to_padded(batches, tb.logprobs(batches), step.num_seqs, step.max_response_len)
    mask = to_padded(batches, [b.loss_mask for b in batches], step.num_seqs, step.max_response_len)
    tb.model.train()
    tb.model.zero_grad(set_to_none=True)
    stats, load = tb._actor_pass(batches, tb.objective)
    grads = {n: p.grad.clone() for n, p in tb.model.named_parameters() if p.grad is not None}
    return step, logp * mask, stats.finalize(), grads, load


@pytest.mark.parametrize(
    "algo",
    [
        {"loss_agg": "token_mean"},
        {"loss_agg": "seq_mean_token_sum", "kl": {"coef": 0.1}},
        {"loss_agg": "seq_mean_token_mean", "kl": {"coef": 0.1, "mode": "reward"}},
        {"moe": {"routing_replay": "trainer"}},
        {"moe": {"routing_replay": "rollout"}, "loss_agg": "seq_mean_token_mean"},
        {"kl": {"coef": 0.1}, "lora": True},
    ],
    ids=["token_mean", "seq_sum_kl_loss", "seq_mean_kl_reward", "r2", "r3", "lora_kl"],
)
def test_shared_step_matches_unshared(toy_tokenizer, groups, algo):
    budget = 20  # splits every 5-sample tree (prompts of 10-11, responses of 1-5 tokens)
    algo = dict(algo)
    trainer = {"lora": {"rank": 4}} if algo.pop("lora", False) else None
    plain = _run(toy_tokenizer, groups, False, algo, budget, trainer)
    shared = _run(toy_tokenizer, groups, True, algo, budget, trainer)
    step = shared[0]
    trees = [b for b in step.micro_batches if b.layout is not None]
    assert trees, "no micro-batch was laid out as prompt trees"
    computed = sum(b.num_tokens for b in step.micro_batches)
    episode = sum(b.episode_tokens for b in step.micro_batches)
    assert computed < episode == sum(b.num_tokens for b in plain[0].micro_batches)
    torch.testing.assert_close(shared[1], plain[1], atol=ATOL, rtol=0)
    for name in ("loss", "pg_loss", "kl", "kl_loss", "clip_frac", "mismatch_abs_diff"):
        if name in plain[2]:
            assert shared[2][name] == pytest.approx(plain[2][name], abs=ATOL), name
    assert shared[3].keys() == plain[3].keys()
    for name, grad in plain[3].items():
        torch.testing.assert_close(shared[3][name], grad, atol=ATOL, rtol=1e-4, msg=name)
    torch.testing.assert_close(shared[4], plain[4])  # expert load counts every sequence


def test_whole_train_step_metrics_match(toy_tokenizer, groups):
    out = {}
    for share in (False, True):
        tb = backend(toy_model(len(toy_tokenizer), seed=1), {"lr": 1e-4}, {})
        metrics = tb.train(_step(groups, share, 4096))
        logp = tb.logprobs(_step(groups, False, 4096).micro_batches)  # after the update
        out[share] = (metrics, logp)
    (plain, plain_after), (shared, shared_after) = out[False], out[True]
    assert shared["tokens"] == plain["tokens"] == plain["computed_tokens"]
    assert shared["computed_tokens"] < plain["computed_tokens"]
    for name in ("loss", "grad_norm", "entropy", "ratio", "advantages"):
        assert shared[name] == pytest.approx(plain[name], abs=1e-5), name
    for a, b in zip(shared_after, plain_after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # Adam: ~lr per weight


def test_a_completion_never_sees_another(toy_tokenizer, groups):
    model = toy_model(len(toy_tokenizer), seed=1).eval()
    group = groups[0]
    changed = [e for e in group.episodes]
    second = changed[1]
    other = (second.response_ids + 5) % len(toy_tokenizer)
    changed[1] = Episode(
        second.prompt_ids, other, second.loss_mask, second.rollout_logprobs, second.versions
    )
    outs = []
    for g in (group, EpisodeGroup(group.prompt_id, changed)):
        batch = _step([g], True, 4096).micro_batches[0]
        assert batch.layout is not None and batch.num_seqs == len(g.episodes)
        with torch.no_grad():
            out = model.token_logprobs(batch.input_ids, batch.cu_seqlens, layout=batch.layout)
        outs.append((batch, out.logprobs))
    (batch, before), (_, after) = outs
    second_tokens = batch.seq_ids == 1
    assert not torch.equal(before[second_tokens], after[second_tokens])
    torch.testing.assert_close(before[~second_tokens], after[~second_tokens], atol=1e-6, rtol=0)


def test_rows_and_layout(toy_tokenizer, groups):
    episodes = [e for g in groups for e in g.episodes]
    group_ids = [i for i, g in enumerate(groups) for _ in g.episodes]
    rows = plan_rows(episodes, group_ids, 20, share=True)
    # every episode once, in order; the mixed group stays one ordinary row per episode
    assert [i for r in rows for i in r.episodes] == list(range(len(episodes)))
    assert [r.shared for r in rows if group_ids[r.episodes[0]] == 3] == [False] * 3
    for r in rows:
        assert r.tokens <= 20
        prompt = len(episodes[r.episodes[0]].prompt_ids)
        responses = sum(len(episodes[i].response_ids) for i in r.episodes)
        assert r.tokens == (prompt + responses if r.shared else episodes[r.episodes[0]].num_tokens)
    for g in range(3):  # each 5-sample group is split into several trees, all with a prompt
        assert len([r for r in rows if group_ids[r.episodes[0]] == g]) > 1
    assert any(r.shared for r in rows)
    unsplit = plan_rows(episodes, group_ids, 4096, share=True)
    assert [len(r.episodes) for r in unsplit if r.shared] == [5, 5, 5]
    batch = _step(groups, True, 4096).micro_batches[0]
    lay = batch.layout
    # a completion's first token is predicted by its prompt's last token; positions continue
    for seq in range(batch.num_seqs):
        index = batch.episode_index(seq)
        e = episodes[int(batch.sample_index[seq])]
        assert batch.input_ids[index].tolist() == [*e.prompt_ids, *e.response_ids]
        assert lay.positions[index].tolist() == list(range(e.num_tokens))
        assert lay.predictor[index[1:]].tolist() == index[:-1].tolist()
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        _step(groups, True, max(e.num_tokens for e in episodes) - 1)


def test_forensics_records_match(toy_tokenizer, groups):
    records = {}
    for share in (False, True):
        step = _step(groups, share, 4096)
        for b in step.micro_batches:
            b.train_logprobs = torch.zeros(b.num_tokens)
        records[share] = top_mismatch(step.micro_batches, 10)
    assert records[True] == records[False]


def test_fallbacks_name_the_reason(groups):
    def job(*overrides: str):
        return load_job("configs/toy_grpo.yaml", overrides)

    assert job().trainer.share_prompt_prefix  # the toy preset shares prompts
    assert fallback_reason(job()) is None
    assert "advantage" in fallback_reason(job("algorithm.advantage=gae"))
    assert "aux_loss_coef" in fallback_reason(job("algorithm.moe.aux_loss_coef=0.01"))
    assert "megatron" in fallback_reason(job("trainer.backend=megatron"))
    replay = ("algorithm.moe.routing_replay=rollout", "algorithm.moe.replay_prompt_routing=true")
    assert "replay_prompt_routing" in fallback_reason(job(*replay))
    assert fallback_reason(job("algorithm.moe.routing_replay=rollout")) is None
    with pytest.raises(ValueError, match="share_prompt_prefix"):
        build_rl_step(
            groups[:1], micro_batch_tokens=64, share_prompt_prefix=True, prompt_routing=True
        )
