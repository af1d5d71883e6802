"""lm_head's chunked logprobs keep a small fp32 forward's logits for the backward (no
recompute matmul): the gradients are bit-identical to the recomputing backward's."""

from __future__ import annotations

import pytest
import torch

from models import logprobs_bf16
from models.logprobs import chunked_token_logprobs


def _grads(hidden, weight, targets, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = chunked_token_logprobs(h, w, targets, with_entropy=True, **kw)
    (logp.sum() + 0.3 * (ent * torch.linspace(0, 1, len(ent))).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_logits_give_the_recomputed_gradients(monkeypatch, temperature):
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=gen), torch.randn(53, 16, generator=gen)
    targets = torch.randint(0, 53, (37,), generator=gen)
    kw = {"temperature": temperature, "chunk_size": 10}
    kept = _grads(hidden, weight, targets, **kw)
    monkeypatch.setattr(logprobs_bf16, "KEEP_LOGITS_BYTES", 0)  # forces the recompute
    recomputed = _grads(hidden, weight, targets, **kw)
    for a, b in zip(kept, recomputed, strict=True):
        assert torch.equal(a, b)


def test_only_a_training_forward_keeps_logits(monkeypatch):
    from models import logprobs

    stores = []
    real = logprobs._fp32_store
    monkeypatch.setattr(
        logprobs, "_fp32_store", lambda h, w: stores.append(real(h, w)) or stores[-1]
    )
    hidden, weight = torch.randn(8, 4), torch.randn(6, 4, requires_grad=True)
    with torch.no_grad():
        chunked_token_logprobs(hidden, weight, torch.zeros(8, dtype=torch.long))
    chunked_token_logprobs(hidden.requires_grad_(), weight, torch.zeros(8, dtype=torch.long))
    assert stores[0] is None and len(stores[1]) == 1  # one chunk's logits, kept
