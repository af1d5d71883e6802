"""LoRA in the torch backend on the toy model: the base stays bit for bit, only adapters train
and travel, the receiving engine model merges them without drift, the KL reference is the
base with adapters off (no copy), and resume continues the same curve."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from configs import ConfigError, TrainerConfig, load_job
from configs.services import LORA_TARGETS
from models.lora import is_adapter_name
from models.weight_update import (
    apply_weight_update,
    encode_weight_update,
    iter_bucket_tensors,
)
from tests.trainer.toy import backend, grpo_step, set_rollout_logprobs, toy_model
from trainer.lora_backend import adapter_bytes

ALL = {"rank": 4, "alpha": 8.0, "target_modules": list(LORA_TARGETS)}


def _lora_backend(tok, lora=None, algo=None, seed=0):
    model = toy_model(tok.vocab_size, seed=seed)
    return backend(model, {"lora": lora or ALL, "lr": 1e-2}, algo)


def _step(tb, tok, seed):
    step = grpo_step(tok, n_prompts=4, n_samples=4, seed=seed)
    set_rollout_logprobs(tb, step)
    return tb.train(step)


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        ({"rank": 0}, "trainer.lora.rank"),
        ({"target_modules": ["qkv"]}, "trainer.lora.target_modules"),
    ],
)
def test_bad_lora_configs_name_the_field(lora, field) -> None:
    with pytest.raises(ValidationError, match=field):
        TrainerConfig(lora=lora)


def test_lora_with_megatron_or_a_critic_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="megatron"):
        TrainerConfig(backend="megatron", lora={})
    with pytest.raises(ConfigError, match="critic"):
        load_job("configs/toy_ppo.yaml", ["trainer.lora={rank: 4}", "algorithm.advantage=gae"])


def test_base_is_bit_identical_and_only_adapters_train(toy_tokenizer) -> None:
    tb = _lora_backend(toy_tokenizer)
    base = {k: v.clone() for k, v in tb.model.state_dict().items()}
    adapters = {k: v.clone() for k, v in tb.lora.state_dict().items()}
    trained = {id(p) for g in tb.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in tb.lora.parameters()}
    for seed in range(3):
        metrics = _step(tb, toy_tokenizer, seed)
        assert metrics["grad_norm"] > 0
    after = tb.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # weights and router bias
    assert all(p.grad is None for p in tb.model.parameters())
    changed = [k for k, v in tb.lora.state_dict().items() if not torch.equal(adapters[k], v)]
    assert len(changed) == len(adapters)  # every A and B moved (B started at zero)


def test_only_adapter_bytes_leave_the_trainer_and_the_engine_merges_without_drift(
    toy_tokenizer,
) -> None:
    tb = _lora_backend(toy_tokenizer)
    engine = toy_model(toy_tokenizer.vocab_size)  # the rollout's copy of the starting model
    ids = torch.randint(0, toy_tokenizer.vocab_size, (17,))
    cu = torch.tensor([0, 17])
    first = None
    for seed in range(3):
        _step(tb, toy_tokenizer, seed)
        update = tb.weight_update()
        names = [n for b in update.buckets for n in b.names]
        assert all(is_adapter_name(n) for n in names)
        payload = sum(
            t.numel() * t.element_size() for b in update.buckets for _, t in iter_bucket_tensors(b)
        )
        assert payload == adapter_bytes(tb.lora)  # the adapters (+ the scaling) and nothing else
        wire = len(encode_weight_update(update))
        assert wire < payload + 4096 + 160 * len(names)  # + the JSON header (names, shapes)
        first = first or update
        apply_weight_update(engine, update)
        with torch.no_grad():
            ours = tb.model.token_logprobs(ids, cu).logprobs
            theirs = engine.token_logprobs(ids, cu).logprobs
        assert (ours - theirs).abs().max().item() < 1e-5
    full = sum(t.numel() * t.element_size() for t in tb.model.state_dict().values())
    assert payload * 10 < full
    # no drift: every update is merged onto the kept base, so re-applying the first one
    # gives exactly the weights it gave the first time
    fresh = toy_model(toy_tokenizer.vocab_size)
    apply_weight_update(fresh, first)
    apply_weight_update(engine, first)
    assert all(torch.equal(a, b) for a, b in zip(engine.parameters(), fresh.parameters()))


def test_kl_reference_is_the_base_with_adapters_off(toy_tokenizer) -> None:
    tb = _lora_backend(toy_tokenizer, algo={"kl": {"coef": 0.1}})
    assert tb.ref is None  # no second copy of the model
    base = toy_model(toy_tokenizer.vocab_size)
    for seed in range(2):
        _step(tb, toy_tokenizer, seed)
    step = grpo_step(toy_tokenizer, n_prompts=2, n_samples=2, seed=9)
    ref = tb.logprobs(step.micro_batches, model="ref")
    actor = tb.logprobs(step.micro_batches)
    with torch.no_grad():
        for b, r, a in zip(step.micro_batches, ref, actor, strict=True):
            expected = base.token_logprobs(b.input_ids, b.cu_seqlens).logprobs
            assert torch.equal(r, expected)
            assert (a - r).abs().max() > 0  # the actor moved away from it


def test_resume_continues_the_same_curve(toy_tokenizer, tmp_path) -> None:
    straight = _lora_backend(toy_tokenizer)
    curve = [_step(straight, toy_tokenizer, s)["grad_norm"] for s in range(2)]
    straight.save(str(tmp_path / "ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=False)
    assert all("lora_A" in k or "lora_B" in k or "_A" in k or "_B" in k for k in saved["model"])
    curve += [_step(straight, toy_tokenizer, s)["grad_norm"] for s in (2, 3)]

    resumed = _lora_backend(toy_tokenizer, seed=0)
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.version == 2
    again = [_step(resumed, toy_tokenizer, s)["grad_norm"] for s in (2, 3)]
    assert again == curve[2:]
    for a, b in zip(straight.lora.parameters(), resumed.lora.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lora_grpo_learns_the_rewarded_answers(toy_tokenizer) -> None:
    """A few LoRA GRPO steps widen the logprob gap between right and wrong sums."""
    tb = _lora_backend(toy_tokenizer)

    def gap() -> float:
        step = grpo_step(toy_tokenizer, n_prompts=4, n_samples=4, seed=5)
        total = {True: [], False: []}
        for b, logp in zip(step.micro_batches, tb.logprobs(step.micro_batches), strict=True):
            seq = torch.zeros(b.num_seqs).index_add_(0, b.seq_ids, logp * b.loss_mask)
            for i, s in zip(b.sample_index.tolist(), seq.tolist(), strict=True):
                total[i % 2 == 0].append(s)  # even samples hold the right sum (tests/trainer/toy)
        return sum(total[True]) / len(total[True]) - sum(total[False]) / len(total[False])

    before = gap()
    for _ in range(4):
        _step(tb, toy_tokenizer, 5)
    after = gap()
    assert after > before + 2.0, (before, after)  # measured: 1.5 -> 7.0


def test_lora_merged_update_for_sglang_is_the_targeted_weights_merged(toy_tokenizer) -> None:
    """rollout.engine sglang loads with LoRA; its update is W + s B A for the targeted weights
    (what hf/ export writes) and nothing else: the untargeted base never changes."""
    from trainer.lora_backend import merged_state

    load_job("configs/toy_grpo_lora.yaml", ["rollout.engine=sglang"])
    tb = _lora_backend(toy_tokenizer)
    _step(tb, toy_tokenizer, 0)
    update = tb.weight_update(lora_merged=True)
    sent = {n: t.clone() for b in update.buckets for n, t in iter_bucket_tensors(b)}
    targeted = set(tb.lora.deltas())
    assert set(sent) == targeted and update.version == tb.version
    merged = dict(merged_state(tb.model, tb.lora))
    base = dict(tb.model.hf_state_dict())
    assert any(not torch.equal(sent[n], base[n]) for n in sent)  # the step moved the adapters
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name], atol=0, rtol=0)
    full_bytes = sum(t.numel() * t.element_size() for t in base.values())
    assert update.nbytes < full_bytes


def test_fp8_engine_with_the_exact_base_quantizes_the_merged_weights_once(toy_tokenizer) -> None:
    from models.fp8 import quantize_model_
    from models.lora_merge import keep_exact_base
    from trainer.lora_backend import merged_state

    tb = _lora_backend(toy_tokenizer)
    _step(tb, toy_tokenizer, 0)
    engine = toy_model(toy_tokenizer.vocab_size)
    keep_exact_base(engine, tb.cfg.lora)  # what the rollout worker does before quantizing
    quantize_model_(engine)
    apply_weight_update(engine, tb.weight_update())
    once = quantize_model_(toy_model(toy_tokenizer.vocab_size))
    once.load_hf_state_dict(merged_state(tb.model, tb.lora))
    ours, theirs = dict(engine.hf_state_dict()), dict(once.hf_state_dict())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours)
