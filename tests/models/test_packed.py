"""The training path: packed sequences, chunked token logprobs/entropy, MoE hooks, R3 replay."""

from __future__ import annotations

import pytest
import torch

from models import RoutingCapture, RoutingReplay
from tests.models.glm_helpers import full_logits, make_model

torch.set_num_threads(1)


def _pack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([0] + [s.numel() for s in seqs])
    return torch.cat(seqs), lengths.cumsum(0)


def test_packed_forward_equals_per_sequence_forward() -> None:
    model = make_model(seed=4)
    seqs = [torch.randint(0, 128, (n,)) for n in (7, 1, 12, 4)]
    ids, cu = _pack(seqs)
    packed = model.lm_head(model.forward_packed(ids, cu).hidden)
    for i, seq in enumerate(seqs):
        alone = full_logits(model, seq)
        assert (packed[cu[i] : cu[i + 1]] - alone).abs().max().item() < 1e-5
    # equal lengths take the no-scatter branch; still per-sequence
    same = [torch.randint(0, 128, (5,)) for _ in range(3)]
    ids, cu = _pack(same)
    packed = model.lm_head(model.forward_packed(ids, cu).hidden)
    assert (packed[5:10] - full_logits(model, same[1])).abs().max().item() < 1e-5


def test_token_logprobs_match_log_softmax_and_chunking_is_invariant() -> None:
    model = make_model(seed=5, tie_word_embeddings=False)
    seqs = [torch.randint(0, 128, (n,)) for n in (6, 9, 2)]
    ids, cu = _pack(seqs)
    temperature = 0.7
    expected, expected_ent = [], []
    for seq in seqs:
        logp = torch.log_softmax(full_logits(model, seq) / temperature, dim=-1)
        lp = torch.zeros(seq.numel())
        lp[1:] = logp[:-1].gather(1, seq[1:, None]).squeeze(1)
        ent = torch.zeros(seq.numel())
        ent[1:] = -(logp[:-1].exp() * logp[:-1]).sum(-1)
        expected.append(lp)
        expected_ent.append(ent)
    expected, expected_ent = torch.cat(expected), torch.cat(expected_ent)
    for chunk in (1024, 5, 1):
        out = model.token_logprobs(
            ids, cu, temperature=temperature, with_entropy=True, chunk_size=chunk
        )
        assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (17,)
        assert (out.logprobs - expected).abs().max().item() < 1e-5
        assert (out.entropy - expected_ent).abs().max().item() < 1e-5
        assert out.logprobs[cu[:-1]].abs().max().item() == 0.0
    assert model.token_logprobs(ids, cu).entropy is None


def test_chunked_logprob_gradients_equal_full_logits_autograd() -> None:
    torch.manual_seed(0)
    seqs = [torch.randint(0, 128, (n,)) for n in (8, 5)]
    ids, cu = _pack(seqs)
    weights = torch.randn(13)
    grads = []
    for chunked in (True, False):
        model = make_model(seed=6, tie_word_embeddings=False)
        if chunked:
            out = model.token_logprobs(ids, cu, temperature=1.3, with_entropy=True, chunk_size=3)
            lp, ent = out.logprobs, out.entropy
        else:
            hidden = model.forward_packed(ids, cu).hidden
            logp = torch.log_softmax(model.lm_head(hidden) / 1.3, dim=-1)
            lp = torch.cat([torch.zeros(1), logp[:-1].gather(1, ids[1:, None]).squeeze(1)])
            ent = torch.cat([torch.zeros(1), -(logp[:-1].exp() * logp[:-1]).sum(-1)])
            starts = torch.zeros(13, dtype=torch.bool)
            starts[cu[:-1]] = True
            lp, ent = lp.masked_fill(starts, 0.0), ent.masked_fill(starts, 0.0)
        (lp * weights).sum().add((ent * weights.flip(0)).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        assert (grads[0][name] - g).abs().max().item() < 1e-5, name
    assert grads[0]["lm_head.weight"].abs().sum() > 0
    assert grads[0]["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_expert_load_and_aux_loss() -> None:
    model = make_model(seed=7)
    ids, cu = _pack([torch.randint(0, 128, (n,)) for n in (10, 6)])
    out = model.forward_packed(ids, cu)
    n_moe, k = len(model.config.moe_layer_ids), model.config.num_experts_per_tok
    assert out.expert_load.shape == (n_moe, model.config.n_routed_experts)
    assert torch.equal(out.expert_load.sum(1), torch.full((n_moe,), 16.0 * k))
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    out.aux_loss.backward()
    router = model.moe_blocks()[0].gate
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_aux_loss_value_matches_definition() -> None:
    model = make_model(seed=8, first_k_dense_replace=2, num_hidden_layers=3)
    ids, cu = _pack([torch.randint(0, 128, (9,))])
    captured = {}
    block = model.moe_blocks()[0]
    block.register_forward_hook(lambda m, a, o: captured.update(x=a[0].detach()))
    out = model.forward_packed(ids, cu)
    scores = torch.sigmoid(captured["x"] @ block.gate.weight.t())
    prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
    frac = out.expert_load[0] / (9 * model.config.num_experts_per_tok)
    expected = model.config.n_routed_experts * (frac * prob).sum()
    assert abs(out.aux_loss.item() - expected.item()) < 1e-6


def test_routing_capture_then_replay_reproduces_and_other_experts_change_output() -> None:
    model = make_model(seed=9, n_routed_experts=8)
    ids, cu = _pack([torch.randint(0, 128, (n,)) for n in (11, 7)])
    capture = RoutingCapture()
    first = model.token_logprobs(ids, cu, routing=capture)
    routed = capture.routed_experts
    assert routed is first.routed_experts
    assert routed.shape == (2, 18, 2) and routed.dtype == torch.int64
    assert bool((routed[..., 1] > routed[..., 0]).all())  # distinct, ascending per token
    replayed = model.token_logprobs(ids, cu, routing=RoutingReplay(routed.clone()))
    assert torch.equal(replayed.logprobs, first.logprobs)
    assert torch.equal(replayed.expert_load, first.expert_load)
    # replay survives a router change: the bias moves selection, the replay pins it
    for block in model.moe_blocks():
        block.gate.e_score_correction_bias += torch.linspace(-1, 1, 8)
    free = model.token_logprobs(ids, cu, routing=RoutingCapture())
    pinned = model.token_logprobs(ids, cu, routing=RoutingReplay(routed))
    assert not torch.equal(free.routed_experts, routed)
    assert torch.equal(pinned.logprobs, first.logprobs)  # bias is selection-only
    # replaying other experts changes the output
    other = (routed + 3) % 8
    other = other.sort(-1).values
    changed = model.token_logprobs(ids, cu, routing=RoutingReplay(other))
    assert (changed.logprobs - first.logprobs).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="RoutingReplay"):
        model.forward_packed(ids, cu, routing=RoutingReplay(routed[:, :5]))


def test_bad_cu_seqlens_raise() -> None:
    model = make_model(seed=0)
    ids = torch.randint(0, 128, (6,))
    for cu in ([0, 3, 5], [1, 6], [0, 4, 4, 6], [0]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            model.forward_packed(ids, torch.tensor(cu))
