"""Policy losses (PPO clip, dual clip, GSPO, SFT) against hand-computed tensors."""

from __future__ import annotations

import math

import torch

from trainer.losses.aggregation import seq_mean_token_mean
from trainer.losses.policy import ClipParams, PolicyInputs, gspo_loss, ppo_clip_loss, sft_loss

CLIP = ClipParams(eps_low=0.2, eps_high=0.28, dual_clip=None)


def _inputs(ratios, advantages, mask=None, seq_ids=None, num_seqs=1):
    old = torch.zeros(len(ratios))
    logp = torch.log(torch.tensor(ratios)).requires_grad_(True)
    mask = torch.ones(len(ratios)) if mask is None else torch.tensor(mask)
    seq_ids = torch.zeros(len(ratios), dtype=torch.long) if seq_ids is None else seq_ids
    return PolicyInputs(logp, old, torch.tensor(advantages), mask, seq_ids, num_seqs)


def test_ppo_clip_higher_hand_computed():
    # ratio 1.5, A +1: max(-1.5, -1.28) = -1.28 (clipped at 1 + 0.28)
    # ratio 0.5, A +1: max(-0.5, -0.8)  = -0.5  (not clipped)
    # ratio 0.5, A -1: max(0.5, 0.8)    = 0.8   (clipped at 1 - 0.2)
    # ratio 1.5, A -1: max(1.5, 1.28)   = 1.5   (not clipped)
    # ratio 1.1, A +2: -2.2 (inside the range)
    inp = _inputs([1.5, 0.5, 0.5, 1.5, 1.1], [1.0, 1.0, -1.0, -1.0, 2.0])
    out = ppo_clip_loss(inp, CLIP)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([-1.28, -0.5, 0.8, 1.5, -2.2]))
    torch.testing.assert_close(out.clipped, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.ratio, torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1]))
    # d loss / d logp = -A * ratio where unclipped, 0 where clipped
    out.loss.sum().backward()
    torch.testing.assert_close(inp.logprobs.grad, torch.tensor([0.0, -0.5, 0.0, 1.5, -2.2]))


def test_dual_clip_bounds_negative_advantage_loss():
    # ratio 4, A -1, c 3: max(4, 1.28) = 4 -> min(4, 3) = 3, no gradient
    # ratio 2, A -1: 2 < 3 stays 2; positive advantages are untouched by the dual clip
    inp = _inputs([4.0, 2.0, 4.0], [-1.0, -1.0, 1.0])
    out = ppo_clip_loss(inp, ClipParams(0.2, 0.28, dual_clip=3.0))
    torch.testing.assert_close(out.loss.detach(), torch.tensor([3.0, 2.0, -1.28]))
    torch.testing.assert_close(out.clipped, torch.tensor([1.0, 0.0, 1.0]))
    out.loss.sum().backward()
    torch.testing.assert_close(inp.logprobs.grad, torch.tensor([0.0, 2.0, 0.0]))


def test_gspo_sequence_ratio_and_stop_gradient():
    # seq0: log-ratio diffs [0.1, 0.3] -> mean 0.2 -> s0 = e^0.2 = 1.2214028, A +1, inside
    # seq1: diffs [0.5, 0.7, (masked 5.0)] -> mean 0.6 -> s1 = e^0.6 = 1.8221188 -> clip 1.28
    diffs = [0.1, 0.3, 0.5, 0.7, 5.0]
    logp = torch.tensor(diffs, requires_grad=True)
    inp = PolicyInputs(
        logp,
        torch.zeros(5),
        torch.ones(5),
        torch.tensor([1.0, 1, 1, 1, 0]),
        torch.tensor([0, 0, 1, 1, 1]),
        2,
    )
    out = gspo_loss(inp, CLIP)
    s0 = math.exp(0.2)
    torch.testing.assert_close(
        out.ratio, torch.tensor([s0, s0, math.exp(0.6), math.exp(0.6), math.exp(0.6)])
    )
    torch.testing.assert_close(out.loss.detach()[:4], torch.tensor([-s0, -s0, -1.28, -1.28]))
    torch.testing.assert_close(out.clipped[:4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # stop-gradient form: d s_it / d logp_t = s_i (each token on its own)
    (out.loss * inp.mask).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-s0, -s0, 0.0, 0.0, 0.0]))


def test_gspo_token_form_matches_the_sequence_objective_gradient():
    # With seq_mean_token_mean, the token form's gradient equals that of -A * s_i averaged
    # over sequences (GSPO's sequence objective), here inside the clip range.
    torch.manual_seed(0)
    diffs = torch.randn(6) * 0.05
    seq_ids, mask = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1.0, 1, 1, 1, 1, 0])
    adv = torch.tensor([0.7, 0.7, 0.7, -1.3, -1.3, -1.3])
    logp = diffs.clone().requires_grad_(True)
    inp = PolicyInputs(logp, torch.zeros(6), adv, mask, seq_ids, 2)
    seq_mean_token_mean(gspo_loss(inp, CLIP).loss, mask, seq_ids, 2).backward()
    ref = diffs.clone().requires_grad_(True)
    s0 = torch.exp((ref[:3] * mask[:3]).sum() / 3)
    s1 = torch.exp((ref[3:] * mask[3:]).sum() / 2)
    (-(0.7 * s0 + -1.3 * s1) / 2).backward()
    torch.testing.assert_close(logp.grad, ref.grad)


def test_sft_loss_is_negative_logprob():
    inp = _inputs([0.5, 0.25], [0.0, 0.0])
    out = sft_loss(inp, CLIP)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([math.log(2), math.log(4)]))
    torch.testing.assert_close(out.ratio, torch.ones(2))
