"""SFT with the MTP layer: frozen at trainer.mtp_loss_weight 0, trained by its own
next-next-token loss above 0 (the logged cross-entropy checked by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from buffer.episode import Episode
from models import Glm4MoeForCausalLM, get_preset
from tests.trainer.toy import backend
from trainer.batch import build_step

torch.set_num_threads(1)


def _model(seed: int = 0) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(get_preset("glm4moe-tiny", num_nextn_predict_layers=1))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _step():
    rng = np.random.default_rng(0)
    episodes = []
    for n_prompt, n_resp in ((5, 7), (3, 4), (6, 2)):
        mask = np.ones(n_resp)
        mask[0] = 0  # an untrained response token: MTP rows aiming at it do not count
        episodes.append(
            Episode(
                prompt_ids=rng.integers(0, 128, n_prompt).tolist(),
                response_ids=rng.integers(0, 128, n_resp).tolist(),
                loss_mask=mask,
                rollout_logprobs=np.zeros(n_resp),
                versions=np.full(n_resp, -1),
                reward=0.0,
            )
        )
    return build_step(episodes, [0, 1, 2], micro_batch_tokens=16)  # two micro-batches


def _mtp_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.mtp.state_dict().items()}


def _hand_mtp_ce(model, step) -> tuple[float, int]:
    """Mean over all (row t, target t+2 trained, same sequence) of -log softmax(lm_head(o_t))."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in step.micro_batches:
            hidden = model.forward_packed(b.input_ids, b.cu_seqlens).hidden
            logp = torch.log_softmax(model.lm_head(model.forward_mtp(b.input_ids, b.cu_seqlens,
                                                                     hidden)[0]), -1)  # fmt: skip
            for s in range(b.num_seqs):
                lo, hi = int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1])
                for t in range(lo, hi - 2):
                    if b.loss_mask[t + 2] > 0:
                        total -= float(logp[t, b.input_ids[t + 2]])
                        count += 1
    return total / count, count


def test_weight_zero_keeps_the_mtp_layer_frozen() -> None:
    model = _model()
    before = _mtp_state(model)
    main_before = model.model.layers[1].self_attn.q_proj.weight.clone()
    tb = backend(model, {"lr": 1e-2}, policy_loss="sft")
    metrics = tb.train(_step())
    assert "mtp_loss" not in metrics and "mtp_ce" not in metrics
    assert not torch.equal(model.model.layers[1].self_attn.q_proj.weight, main_before)
    for name, t in model.mtp.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_mtp_loss_trains_the_mtp_layer_and_logs_its_cross_entropy() -> None:
    model = _model(1)
    step = _step()
    expected_ce, n_targets = _hand_mtp_ce(model, step)
    assert n_targets == 6 + 3 + 1  # response tokens 1.. of each sequence
    before = _mtp_state(model)
    tb = backend(model, {"lr": 1e-2, "mtp_loss_weight": 0.3}, policy_loss="sft")
    metrics = tb.train(step)
    assert metrics["mtp_ce"] == pytest.approx(expected_ce, rel=1e-5)
    # loss share = weight * CE sum / the step's loss tokens (the SFT loss's denominator)
    loss_tokens = sum(float(b.loss_mask.sum()) for b in step.micro_batches)
    assert metrics["mtp_loss"] == pytest.approx(
        0.3 * expected_ce * n_targets / loss_tokens, rel=1e-5
    )
    changed = [n for n, t in model.mtp.state_dict().items() if not torch.equal(t, before[n])]
    assert "0.eh_proj.weight" in changed and "0.decoder.self_attn.q_proj.weight" in changed
    assert "0.shared_head.norm.weight" in changed and "0.enorm.weight" in changed


def test_mtp_loss_weight_without_an_mtp_layer_names_the_field() -> None:
    model = Glm4MoeForCausalLM(get_preset("glm4moe-tiny"))
    with pytest.raises(ValueError, match="trainer.mtp_loss_weight"):
        backend(model, {"mtp_loss_weight": 0.1}, policy_loss="sft")
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        backend(model, {"mtp_loss_weight": -1.0}, policy_loss="sft")
