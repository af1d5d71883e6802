"""The training forward runs the last layer's MLP only on the rows that predict trainable tokens
(forward_packed's `keep`), with the full pass's numbers: logprobs, entropies, expert load, aux
loss and every parameter's gradient equal (fp32 tolerance) to the pass over every row."""

from __future__ import annotations

import torch

from models.moe import RoutingCapture, RoutingReplay
from tests.trainer.toy import grpo_step, toy_model
from trainer.forward import trainable_logprobs


def _pass(model, batch, full: bool, routing=None):
    model.zero_grad(set_to_none=True)
    out = trainable_logprobs(model, batch, chunk_size=16, routing=routing, full_hidden=full)
    loss = ((out.logprobs + 0.1 * out.entropy) * batch.loss_mask).sum() + 0.3 * out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(a, b) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    for field in ("logprobs", "entropy", "expert_load", "aux_loss"):
        torch.testing.assert_close(getattr(out_a, field), getattr(out_b, field), msg=field)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)


def test_kept_rows_give_the_full_pass_numbers(toy_tokenizer):
    for share in (True, False):
        step = grpo_step(toy_tokenizer, n_prompts=3, n_samples=4, seed=4, share_prompt_prefix=share)
        batch = step.micro_batches[0]
        assert (batch.layout is not None) == share
        batch.loss_mask[batch.cu_seqlens[1] - 1] = 0.0  # a masked-out token
        model = toy_model(len(toy_tokenizer), seed=4)
        _assert_same(_pass(model, batch, full=True), _pass(model, batch, full=False))
        capture = RoutingCapture()  # replayed routing (R2) through both passes
        with torch.no_grad():
            model.forward_packed(batch.input_ids, batch.cu_seqlens, routing=capture,
                                 layout=batch.layout)  # fmt: skip
        replay = RoutingReplay(capture.routed_experts)
        _assert_same(_pass(model, batch, True, replay), _pass(model, batch, False, replay))


def test_last_layer_experts_see_only_the_kept_rows(toy_tokenizer):
    step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=5, share_prompt_prefix=True)
    batch = step.micro_batches[0]
    model = toy_model(len(toy_tokenizer), seed=5)
    rows: list[int] = []
    last = model.moe_blocks()[-1]
    hook = last.experts.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    trainable_logprobs(model, batch, chunk_size=16)
    trainable_logprobs(model, batch, chunk_size=16, full_hidden=True)
    hook.remove()
    predictors = batch.predictor[(batch.loss_mask > 0) & (batch.predictor >= 0)].unique()
    k = model.config.num_experts_per_tok
    assert rows == [predictors.numel() * k, batch.num_tokens * k]
    assert predictors.numel() < batch.num_tokens  # the prompts' rows are skipped


def test_moe_rows_are_the_full_output_at_those_rows():
    from tests.trainer.toy import toy_model as make

    model = make(64, seed=6)
    moe = model.moe_blocks()[0]
    x = torch.randn(23, model.config.hidden_size)
    rows = torch.tensor([0, 3, 4, 10, 22])
    full, part = moe(x, aux=True), moe(x, aux=True, rows=rows)
    torch.testing.assert_close(part.hidden, full.hidden[rows])
    assert torch.equal(part.experts, full.experts) and torch.equal(part.load, full.load)
    torch.testing.assert_close(part.aux_loss, full.aux_loss)
