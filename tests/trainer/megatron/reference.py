"""The torch side of the megatron parity tests: model, batches, objective, one training step.

Run inside a torchrun worker (worker.py) after the CPU shim is installed. The reference is
our torch GLM-4.x model (models.Glm4MoeForCausalLM) trained with torch.optim.AdamW, global
grad-norm clipping and the loss-free expert-bias update written out here from its definition
(bias_i += rate * sign(mean load - load_i)), on the same batches and the same shared
ActorObjective the megatron backend uses.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.distributed as dist

from buffer.episode import Episode, EpisodeGroup
from configs.algorithm import AlgorithmConfig, KLConfig, MoEConfig, TISConfig
from configs.services import MegatronConfig, TrainerConfig
from models import Glm4MoeForCausalLM, build_weight_update, get_preset, iter_bucket_tensors
from trainer.backend import PackedBatch
from trainer.batch import build_rl_step
from trainer.losses import ActorObjective, StepTotals
from trainer.megatron.backend import MegatronBackend
from trainer.torch_backend import TorchBackend

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


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def run_scenario(args: argparse.Namespace) -> dict:
    """Build both sides, run the checks of worker.py's docstring, return the figures."""
    model = build_model(untied=args.untied)
    hf = dict(model.hf_state_dict())
    batches = make_batches(model)
    trainer = TrainerConfig(
        lr=LR,
        grad_clip=1.0,
        steps=10,
        megatron=MegatronConfig(
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            dispatcher=args.dispatcher,
            distributed_optimizer=args.dist_opt,
            recompute=args.recompute,
        ),
    )
    algo = algorithm()
    backend = MegatronBackend(model.config, hf, trainer, algo, seed=0)
    objective = ActorObjective.from_config(algo)
    out: dict = {"world": dist.get_world_size()}
    exported = dict(backend.export_weights())
    out["roundtrip_missing"] = sorted(set(hf) - set(exported))
    out["roundtrip_extra"] = sorted(set(exported) - set(hf))
    out["roundtrip_unequal"] = sorted(
        k for k in hf if k in exported and not torch.equal(hf[k], exported[k])
    )
    out.update(_fp8_update_check(backend, hf))
    if args.pp == 1 and not args.recompute:  # later stages need their input; recompute saves none
        out["activation_ratios"] = _activation_ratios(backend, batches[0], args)
    ref_lp = torch_logprobs(model, batches)
    mg_lp = backend.logprobs(batches)
    out["logprob_max_diff"] = _max_diff(mg_lp, ref_lp)
    metrics = backend.train_step(batches)
    out["megatron_loss"] = metrics["loss"]
    out["metrics"] = metrics
    out["torch_loss"] = torch_step(model, batches, objective)
    after_step = backend.logprobs(batches)
    out["step_logprob_max_diff"] = _max_diff(after_step, torch_logprobs(model, batches))
    trained = dict(backend.export_weights())
    out["step_weight_max_diff"] = max(
        float((trained[k].float() - v.float()).abs().max()) for k, v in model.hf_state_dict()
    )
    diffs = {
        k: float((trained[k].float() - v.float()).abs().max()) for k, v in model.hf_state_dict()
    }
    out["step_weight_worst"] = sorted(diffs, key=diffs.get)[-3:]
    out["bias_max_diff"] = max(
        float((trained[k] - v).abs().max())
        for k, v in model.hf_state_dict()
        if k.endswith("e_score_correction_bias")
    )
    out["ref_equals_initial"] = all(
        torch.equal(a, b) for a, b in zip(backend.logprobs(batches, model="ref"), mg_lp)
    )
    out["actor_unchanged_by_ref"] = all(
        torch.equal(a, b) for a, b in zip(backend.logprobs(batches), after_step)
    )
    if args.ckpt:
        out.update(_checkpoint_roundtrip(backend, batches, args.out))
    out["finite"] = all(math.isfinite(v) for v in metrics.values())
    return out


def _activation_ratios(backend: MegatronBackend, batch: PackedBatch, args) -> list[float]:
    """Per local layer: bytes the autograd graph keeps for backward per token (measured with
    saved-tensor hooks, parameters excluded) / memory_plan.layer_activation_bytes (x2: the plan
    counts bf16, this run is fp32)."""
    from trainer.megatron.memory_plan import PlanInputs, layer_activation_bytes

    params = {p.data_ptr() for p in backend.gpt.parameters()}
    current: list[int | None] = [None]
    kept: dict[int, dict[int, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if current[0] is not None and tensor.data_ptr() not in params:
            kept.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    layers = backend.gpt.decoder.layers
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    item = backend._inputs([batch])[0]
    routers = [m for m in backend.gpt.modules() if getattr(m, "expert_bias", None) is not None]
    counts = [r.local_tokens_per_expert.clone() for r in routers]
    backend.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.model(item.input_ids, None, None, packed_seq_params=item.packed)
    for hook in hooks:
        hook.remove()
    for router, count in zip(routers, counts):  # this forward must not feed the bias update
        router.local_tokens_per_expert.copy_(count)
    plan = PlanInputs(backend.trainer.megatron, dist.get_world_size(), dtype="float32")
    pattern, offset = backend.arch.moe_layer_pattern, layers[0].layer_number - 1
    tokens = item.input_ids.shape[1]
    return [
        sum(kept[i].values())
        / tokens
        / (2 * layer_activation_bytes(backend.arch, plan, bool(pattern[offset + i])))
        for i in range(len(layers))
    ]


def _fp8_update_check(backend: MegatronBackend, hf: dict) -> dict:
    """backend.weight_update with FP8 equals models.build_weight_update of the HF weights."""
    block = (32, 32)
    ours = backend.weight_update(fp8_block=block)
    theirs = build_weight_update(hf.items(), 0, fp8_block=block, dtype=torch.float32)

    def tensors(update) -> dict:
        return {n: t for b in update.buckets for n, t in iter_bucket_tensors(b)}

    mine, ref = tensors(ours), tensors(theirs)
    same = set(mine) == set(ref) and all(
        mine[n].dtype == ref[n].dtype
        and torch.equal(mine[n].view(torch.uint8), ref[n].view(torch.uint8))
        for n in ref
    )
    return {
        "fp8_update_equal": same,
        "fp8_pairs": sum(n.endswith("_scale_inv") for n in mine),
        "fp8_version": ours.version,
    }


def _checkpoint_roundtrip(backend: MegatronBackend, batches, out_dir: str) -> dict:
    path = f"{out_dir}/ckpt"
    saved_version = backend.version
    backend.save(path)
    saved = backend.logprobs(batches)
    backend.train_step(batches)
    moved = _max_diff(backend.logprobs(batches), saved)
    backend.load(path)
    restored = backend.logprobs(batches)
    again = backend.train_step(batches)
    return {
        "ckpt_moved_by_step": moved,
        "ckpt_restored_exact": all(torch.equal(a, b) for a, b in zip(restored, saved)),
        "ckpt_version": backend.version - 1,
        "ckpt_saved_version": saved_version,
        "ckpt_step_after_load_finite": math.isfinite(again["loss"]),
    }


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


def run_service_scenario(args: argparse.Namespace) -> dict:
    """MegatronBackend.train(own share) on every rank vs TorchBackend.train(whole step): the
    service's GRPO step (old-logprob pass recording the routing, ref pass, advantages, 2 PPO
    epochs replaying the routing)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model(untied=args.untied)
    vocab = model.config.vocab_size
    shares = [episode_groups(vocab, 3, seed=100 + r) for r in range(world)]
    algo = AlgorithmConfig(
        advantage="grpo",
        kl=KLConfig(coef=0.05),
        tis=TISConfig(enabled=True),
        entropy_coef=0.01,
        moe=MoEConfig(routing_replay=True),
    )
    cfg = dict(lr=LR, grad_clip=1.0, steps=10, ppo_epochs=2)
    par = MegatronConfig(
        tp=args.tp, pp=args.pp, ep=args.ep, distributed_optimizer=args.dist_opt,
        recompute=args.recompute,
    )  # fmt: skip
    megatron = MegatronBackend(
        model.config, dict(model.hf_state_dict()), TrainerConfig(**cfg, megatron=par), algo
    )
    mine = build_rl_step(shares[rank], micro_batch_tokens=48)
    mg_metrics = megatron.train(mine)
    whole = build_rl_step([g for share in shares for g in share], micro_batch_tokens=48)
    torch_backend = TorchBackend(model, TrainerConfig(**cfg), algo)
    torch_metrics = torch_backend.train(whole)

    def probe():
        return build_rl_step(episode_groups(vocab, 2, seed=7), micro_batch_tokens=64).micro_batches

    mg_probe, torch_probe = probe(), probe()
    after = _max_diff(megatron.logprobs(mg_probe), torch_backend.logprobs(torch_probe))
    routed_equal = all(
        torch.equal(a.routed_experts, b.routed_experts) for a, b in zip(mg_probe, torch_probe)
    )
    version = megatron.version
    forced = _forced_routing_step(megatron, torch_backend, probe)
    keys = ["loss", "pg_loss", "kl_loss", "entropy", "clip_frac", "tis_weight", "moe/imbalance"]
    return {
        "service_metric_diffs": {k: abs(mg_metrics[k] - torch_metrics[k]) for k in keys},
        "service_tokens": [mg_metrics["tokens"], torch_metrics["tokens"]],
        "service_logprob_max_diff": after,
        "service_version": version,
        "service_routed_equal": routed_equal,
        "service_routed_shape": list(mg_probe[0].routed_experts.shape),
        **forced,
    }


def _forced_routing_step(megatron: MegatronBackend, torch_backend: TorchBackend, probe) -> dict:
    """Train one step on both backends with every token forced to other experts than its own
    ((e + 1) mod E of the captured routing): replay must really steer megatron's routers."""
    mg_batches, torch_batches = probe(), probe()
    torch_backend.logprobs(torch_batches)  # captures the natural routing
    experts = torch_backend.model.config.n_routed_experts
    natural = []
    for mg, tb in zip(mg_batches, torch_batches):
        with torch.no_grad():
            out = torch_backend.model.token_logprobs(
                tb.input_ids, tb.cu_seqlens, temperature=tb.temperature, with_entropy=True
            )
        natural.append(float((out.entropy * tb.loss_mask).sum() / tb.loss_mask.sum()))
        tb.routed_experts = ((tb.routed_experts + 1) % experts).sort(dim=-1).values
        mg.routed_experts = tb.routed_experts.clone()
    mg_metrics = megatron.train_step(mg_batches)
    torch_metrics = torch_backend.train_step(torch_batches)
    return {
        "forced_entropy_diff": abs(mg_metrics["entropy"] - torch_metrics["entropy"]),
        "forced_entropies": [mg_metrics["entropy"], torch_metrics["entropy"], *natural],
        "forced_vs_natural_entropy": abs(torch_metrics["entropy"] - sum(natural) / len(natural)),
    }


def run_bf16_scenario(args: argparse.Namespace) -> dict:
    """bf16 training (Float16Module, fp32 main params in the optimizer): the fp32 expert bias
    survives the cast, the export equals the HF weights cast to bf16, logprobs stay within
    bf16 error of the fp32 torch model and three steps on one batch lower the loss."""
    model = build_model(untied=args.untied)
    hf = dict(model.hf_state_dict())
    batches = make_batches(model)
    par = MegatronConfig(tp=args.tp, pp=args.pp, ep=args.ep, distributed_optimizer=args.dist_opt)
    trainer = TrainerConfig(dtype="bfloat16", lr=LR, megatron=par)
    backend = MegatronBackend(model.config, hf, trainer, algorithm())
    exported = {k: v.clone() for k, v in backend.export_weights()}  # views of live params
    logprob_diff = _max_diff(backend.logprobs(batches), torch_logprobs(model, batches))
    losses = [backend.train_step(batches)["loss"] for _ in range(3)]
    return {
        "bf16_export_exact": all(
            exported[k].dtype == (torch.float32 if "correction_bias" in k else torch.bfloat16)
            and torch.equal(exported[k], v.to(exported[k].dtype))
            for k, v in hf.items()
        ),
        "bf16_logprob_max_diff": logprob_diff,
        "bf16_losses": losses,
    }


def run_group_routing_scenario(args: argparse.Namespace) -> dict:
    """Group-limited routing (n_group 2, topk_group 1: both experts from the better group,
    groups scored by their top-2 biased scores as in HF) -> megatron's moe_router_num_groups."""
    model = build_model(untied=args.untied, n_group=2, topk_group=1)
    batches = make_batches(model)
    par = MegatronConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    backend = MegatronBackend(
        model.config, dict(model.hf_state_dict()), TrainerConfig(megatron=par), algorithm()
    )
    plain = build_model(untied=args.untied)  # same weights, no group limit
    return {
        "group_logprob_max_diff": _max_diff(
            backend.logprobs(batches), torch_logprobs(model, batches)
        ),
        "group_vs_ungrouped": _max_diff(
            torch_logprobs(plain, batches), torch_logprobs(model, batches)
        ),
    }
