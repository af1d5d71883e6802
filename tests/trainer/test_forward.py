"""The training forward computes logprobs only at trainable tokens, equal to token_logprobs."""

from __future__ import annotations

import torch

from tests.trainer.toy import grpo_step, toy_model
from trainer.forward import trainable_logprobs


def test_trainable_logprobs_equal_token_logprobs_with_the_same_gradient(toy_tokenizer):
    step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=3, seed=10)
    batch = step.micro_batches[0]
    batch.loss_mask[batch.cu_seqlens[1] - 2] = 0.0  # a masked-out (tool) token mid-response
    batch.temperature = 0.7
    mask = batch.loss_mask
    model = toy_model(len(toy_tokenizer), seed=10)
    full = model.token_logprobs(
        batch.input_ids, batch.cu_seqlens, temperature=0.7, with_entropy=True
    )
    ((full.logprobs + 0.1 * full.entropy) * mask).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = trainable_logprobs(model, batch, chunk_size=7)
    ((out.logprobs + 0.1 * out.entropy) * mask).sum().backward()
    # Not bitwise: chunking the lm_head changes the matmul shapes, so the CPU kernels may
    # block (and round) the fp32 sums differently; fp32 tolerances cover that.
    torch.testing.assert_close(out.logprobs.detach(), full.logprobs.detach() * mask)
    torch.testing.assert_close(out.entropy.detach(), full.entropy.detach() * mask)
    torch.testing.assert_close(out.expert_load, full.expert_load)
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
    assert torch.all(out.logprobs[mask == 0] == 0)
