"""trainer.dtype bfloat16: mixed precision (bf16 matmuls, fp32 master weights, optimizer state,
gradients and loss logprobs), checked against the same step in fp32.

Tolerances: the fp32 parity tests hold logprobs to ~1e-5; bf16 keeps 8 mantissa bits, so a
toy model's logprobs move by a few hundredths of a nat (0.023 measured) and a step's metrics by
under a percent. The bounds below are looser than that, stated per check; "bf16 really ran"
is checked as well (not equal).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import logprobs_bf16
from models.logprobs import chunked_token_logprobs
from tests.trainer.toy import backend, grpo_step, set_rollout_logprobs, toy_model

MATMULS = {"mm", "bmm", "addmm", "_grouped_mm", "_scaled_dot_product_flash_attention_for_cpu"}


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matmul-like op's first two tensor operands (forward and
    backward; attention's backward also reads its fp32 log-sum-exp, which is not an operand)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name in MATMULS or name.startswith("_scaled_dot_product"):
            dtypes = tuple(
                a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()
            )[:2]
            self.seen.append((name, dtypes))
        return func(*args, **(kwargs or {}))


def _step(tokenizer, dtype: str, seed: int = 8):
    model = toy_model(len(tokenizer), seed=seed)
    tb = backend(model, {"dtype": dtype}, {"advantage": "grpo", "entropy_coef": 0.01})
    step = grpo_step(tokenizer, n_prompts=2, n_samples=4, seed=seed)
    set_rollout_logprobs(tb, step)
    return model, tb, step


def test_bf16_step_computes_in_bf16_and_keeps_fp32_state(toy_tokenizer):
    model, tb, step = _step(toy_tokenizer, "bfloat16")
    recorder = _MatmulDtypes()
    with recorder:
        tb.train(step)
    names = {name for name, _ in recorder.seen}
    assert {"mm", "_grouped_mm"} <= names  # dense layers, lm_head and the routed experts
    # attention runs in fp32 on a CPU by design (models.attention_paths.training_sdpa: torch's
    # CPU flash backward takes ~4x its fp32 time in bf16); every other matmul in bf16
    attention = [d for n, d in recorder.seen if n.startswith("_scaled_dot_product")]
    assert attention and all(d == (torch.float32, torch.float32) for d in attention)
    fp32 = [
        (n, d)
        for n, d in recorder.seen
        if d != (torch.bfloat16, torch.bfloat16) and not n.startswith("_scaled_dot_product")
    ]
    assert not fp32, f"matmuls left in fp32 under trainer.dtype bfloat16: {fp32[:5]}"
    # master weights, their gradients and AdamW's moments stay fp32
    for p in model.parameters():
        assert p.dtype == torch.float32
        if p.grad is not None:
            assert p.grad.dtype == torch.float32
    states = [s for s in tb.optimizer.state.values() if s]
    assert states and all(
        s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states
    )
    # the loss reads fp32 logprobs (what the mismatch forensics keep, too)
    assert step.micro_batches[0].train_logprobs.dtype == torch.float32


def test_bf16_step_tracks_the_fp32_step(toy_tokenizer):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model, tb, step = _step(toy_tokenizer, dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        metrics = tb.train(step)
        delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
        after = tb.logprobs(step.micro_batches)[0]
        assert after.dtype == torch.float32
        runs[dtype] = (metrics, delta, after, step.micro_batches[0].loss_mask > 0)
    (m32, d32, lp32, mask), (m16, d16, lp16, _) = runs["float32"], runs["bfloat16"]
    # logprobs after the step: within 0.1 nats per token (fp32 parity: 1e-5), and not equal
    gap = float((lp16 - lp32)[mask].abs().max())
    assert 0 < gap < 0.1
    # the same update: AdamW's first step is ~lr * sign(grad), so directions must agree (0.96
    # measured here; tiny gradients may flip sign under bf16, hence the margin)
    cos = torch.nn.functional.cosine_similarity(d32, d16, dim=0)
    assert float(cos) > 0.8, f"bf16 update direction vs fp32: cosine {float(cos):.3f}"
    assert m16["entropy"] == pytest.approx(m32["entropy"], rel=2e-2)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.1)


def test_chunked_logprobs_under_autocast_match_fp32_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(96, 32, requires_grad=True)
    targets = torch.randint(0, 96, (40,))
    grads = {}
    for dtype in (None, torch.bfloat16):
        hidden.grad = weight.grad = None
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            logp, entropy = chunked_token_logprobs(
                hidden, weight, targets, with_entropy=True, chunk_size=16
            )
        assert logp.dtype == entropy.dtype == torch.float32
        (logp.sum() + 0.1 * entropy.sum()).backward()
        assert hidden.grad.dtype == weight.grad.dtype == torch.float32
        grads[dtype] = (logp.detach(), hidden.grad.clone(), weight.grad.clone())
    (lp32, gh32, gw32), (lp16, gh16, gw16) = grads[None], grads[torch.bfloat16]
    assert 0 < float((lp16 - lp32).abs().max()) < 0.5  # |logits| ~ 6: bf16 rounding ~0.03 each
    for g16, g32 in ((gh16, gh32), (gw16, gw32)):
        rel = float((g16 - g32).norm() / g32.norm())
        assert rel < 0.02, f"relative gradient error {rel:.4f} under bf16 autocast"


def _two_steps(tokenizer, cached: bool):
    model = toy_model(len(tokenizer), seed=8)
    tb = backend(model, {"dtype": "bfloat16"}, {"advantage": "grpo", "entropy_coef": 0.01})
    if not cached:
        tb._bf16_weights = None  # plain autocast: a cast of each weight in every forward
    step = grpo_step(tokenizer, n_prompts=2, n_samples=4, seed=8, micro_batch_tokens=64)
    assert len(step.micro_batches) == 2  # the cached copies serve several forwards per step
    set_rollout_logprobs(tb, step)
    metrics = [tb.train(step) for _ in range(2)]
    return model, tb, metrics


def test_bf16_weight_cache_is_autocast_cast_once_per_step(toy_tokenizer):
    plain_model, _, plain_metrics = _two_steps(toy_tokenizer, cached=False)
    model, tb, metrics = _two_steps(toy_tokenizer, cached=True)
    weights = tb._bf16_weights
    slots = len(weights._slots)
    # every nn.Linear weight but lm_head's (its fp32 gradient sum) and both fused expert
    # weights of each MoE layer
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert slots == linears - 1 + 2 * len(model.moe_blocks())
    # one cast per weight per optimizer step, although each step ran 2 micro-batches, the
    # logprob passes and a backward: the first step's copies also served set_rollout_logprobs
    assert weights.casts == 2 * slots
    # the same numbers as autocast's own casts, bit for bit, after two steps
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: the cached bf16 weights changed the update"
        assert type(p) is torch.nn.Parameter and p.dtype == torch.float32  # masters restored
    assert [m["loss"] for m in metrics] == [m["loss"] for m in plain_metrics]


def test_bf16_weight_cache_is_refreshed_after_every_optimizer_step(toy_tokenizer):
    model, tb, _ = _two_steps(toy_tokenizer, cached=True)
    weights = tb._bf16_weights
    head, experts = model.model.layers[0].self_attn.q_proj, model.moe_blocks()[0].experts
    # the fused AdamW updates the masters in place without bumping their version counter:
    # the optimizer's post-step hook is what stales the copies (without it they would be
    # the previous step's weights, silently)
    assert weights.refresh() == len(weights._slots)
    for module, name in ((head, "weight"), (experts, "gate_up_proj"), (experts, "down_proj")):
        master = getattr(module, name)
        assert torch.equal(weights.cached(module, name), master.detach().to(torch.bfloat16))
    assert weights.refresh() == 0  # nothing changed since
    with torch.no_grad():  # a change outside the optimizer (e.g. a checkpoint load's copy_)
        head.weight.mul_(2.0)
    assert torch.equal(weights.cached(head, "weight"), head.weight.detach().to(torch.bfloat16))
    assert weights.refresh() == 0  # only that weight was re-cast, by cached()


def test_float32_backend_has_no_weight_cache(toy_tokenizer):
    model = toy_model(len(toy_tokenizer), seed=8)
    assert backend(model, {"dtype": "float32"})._bf16_weights is None


@pytest.mark.parametrize("terms", ["logp", "entropy", "both"])
def test_bf16_lm_head_tiles_give_the_one_tile_numbers(monkeypatch, terms):
    """models/logprobs_bf16.py works on row tiles of each chunk; tiles of 3 rows (uneven over
    chunks of 16) must give what whole-chunk tiles give, the backward's recomputed logits what
    the kept ones give, and both track fp32."""
    torch.manual_seed(1)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(96, 32, requires_grad=True)
    targets = torch.randint(0, 96, (40,))

    def run(dtype):
        hidden.grad = weight.grad = None
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            logp, ent = chunked_token_logprobs(
                hidden, weight, targets, temperature=0.7, with_entropy=True, chunk_size=16
            )
        loss = {"logp": logp.sum(), "entropy": ent.sum(), "both": logp.sum() - 0.3 * ent.sum()}
        loss[terms].backward()
        return logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone()

    whole = run(torch.bfloat16)  # 40 x 96 bf16 logits: kept for the backward
    monkeypatch.setattr(logprobs_bf16, "TILE_BYTES", 3 * 4 * 96)
    tiled = run(torch.bfloat16)
    monkeypatch.setattr(logprobs_bf16, "KEEP_LOGITS_BYTES", 0)
    recomputed = run(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, tiled)), "recomputed logits differ"
    fp32 = run(None)
    # the entropy's gradient alone is a difference of near-equal terms: 0.033 of fp32 here at
    # bf16 logits (the untiled bf16 code measured the same), else under 0.01
    limit = 0.05 if terms == "entropy" else 0.02
    for name, a, b, ref in zip(("logp", "entropy", "grad h", "grad w"), tiled, whole, fp32):
        assert torch.equal(a, b), f"{name}: 3-row tiles differ from whole-chunk tiles"
        rel = float((a - ref).norm() / ref.norm())
        assert rel < limit, f"{name}: {rel:.4f} relative to fp32"


def test_bf16_gradients_reuse_the_last_steps_tensors(toy_tokenizer):
    """The cached weights' fp32 gradients land in the previous step's gradient tensors (kept
    past zero_grad's set_to_none), not in fresh memory; the numbers are checked bit for bit
    against plain autocast in test_bf16_weight_cache_is_autocast_cast_once_per_step."""
    model = toy_model(len(toy_tokenizer), seed=8)
    tb = backend(model, {"dtype": "bfloat16"}, {"advantage": "grpo", "entropy_coef": 0.01})
    step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=4, seed=8, micro_batch_tokens=64)
    set_rollout_logprobs(tb, step)
    weights = tb._bf16_weights
    masters = [weights._master(i) for i in range(len(weights._slots))]
    tb.train(step)
    first = [p.grad.data_ptr() for p in masters]
    tb.train(step)
    assert [p.grad.data_ptr() for p in masters] == first
    assert all(p.grad.dtype == torch.float32 for p in masters)
