"""The megatron backend test scenarios run by worker.py (see its docstring for the checks).

Each `run_*` builds a MegatronBackend under the worker's layout next to the torch reference
(reference.py) and returns the figures test_backend.py asserts on.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist

from configs.algorithm import AlgorithmConfig, KLConfig, MoEConfig, TISConfig
from configs.services import MegatronConfig, TrainerConfig
from models import build_weight_update, iter_bucket_tensors
from tests.trainer.megatron.reference import (
    LR,
    algorithm,
    build_model,
    episode_groups,
    make_batches,
    max_diff,
    torch_logprobs,
    torch_step,
)
from trainer.backend import PackedBatch
from trainer.batch import build_rl_step
from trainer.losses import ActorObjective
from trainer.megatron.backend import MegatronBackend
from trainer.torch_backend import TorchBackend


def _layout(args: argparse.Namespace) -> MegatronConfig:
    return MegatronConfig(
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        dispatcher=args.dispatcher,
        distributed_optimizer=args.dist_opt,
        recompute=args.recompute,
    )


def _roundtrip(backend: MegatronBackend, hf: dict) -> dict:
    exported = dict(backend.export_weights())
    return {
        "roundtrip_missing": sorted(set(hf) - set(exported)),
        "roundtrip_extra": sorted(set(exported) - set(hf)),
        "roundtrip_unequal": sorted(
            k for k in hf if k in exported and not torch.equal(hf[k], exported[k])
        ),
    }


def _after_step(backend: MegatronBackend, model, batches, initial: list[torch.Tensor]) -> dict:
    """Both sides took one step: logprobs, weights, expert bias; then the ref swap."""
    after_step = backend.logprobs(batches)
    trained = dict(backend.export_weights())
    diffs = {
        k: float((trained[k].float() - v.float()).abs().max()) for k, v in model.hf_state_dict()
    }
    return {
        "step_logprob_max_diff": max_diff(after_step, torch_logprobs(model, batches)),
        "step_weight_max_diff": max(diffs.values()),
        "step_weight_worst": sorted(diffs, key=diffs.get)[-3:],
        "bias_max_diff": max(v for k, v in diffs.items() if k.endswith("correction_bias")),
        "ref_equals_initial": all(
            torch.equal(a, b) for a, b in zip(backend.logprobs(batches, model="ref"), initial)
        ),
        "actor_unchanged_by_ref": all(
            torch.equal(a, b) for a, b in zip(backend.logprobs(batches), after_step)
        ),
    }


def run_scenario(args: argparse.Namespace) -> dict:
    """Build both sides, run the checks of worker.py's docstring, return the figures."""
    model = build_model(untied=args.untied)
    hf = dict(model.hf_state_dict())
    batches = make_batches(model)
    trainer = TrainerConfig(lr=LR, grad_clip=1.0, steps=10, megatron=_layout(args))
    algo = algorithm()
    backend = MegatronBackend(model.config, hf, trainer, algo, seed=0)
    out: dict = {"world": dist.get_world_size(), **_roundtrip(backend, hf)}
    out.update(_fp8_update_check(backend, hf))
    if args.pp == 1 and not args.recompute:  # later stages need their input; recompute saves none
        out["activation_ratios"] = _activation_ratios(backend, batches[0], args)
    initial = backend.logprobs(batches)
    out["logprob_max_diff"] = max_diff(initial, torch_logprobs(model, batches))
    metrics = backend.train_step(batches)
    out.update(megatron_loss=metrics["loss"], metrics=metrics)
    out["torch_loss"] = torch_step(model, batches, ActorObjective.from_config(algo))
    out.update(_after_step(backend, model, batches, initial))
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
    moved = max_diff(backend.logprobs(batches), saved)
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
    par = _layout(args)
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
    after = max_diff(megatron.logprobs(mg_probe), torch_backend.logprobs(torch_probe))
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
    logprob_diff = max_diff(backend.logprobs(batches), torch_logprobs(model, batches))
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
        "group_logprob_max_diff": max_diff(
            backend.logprobs(batches), torch_logprobs(model, batches)
        ),
        "group_vs_ungrouped": max_diff(
            torch_logprobs(plain, batches), torch_logprobs(model, batches)
        ),
    }


def run_r3_scenario(args: argparse.Namespace) -> dict:
    """R3 (routing_replay rollout): the logprob pass forces the engine's experts on response
    rows (here the torch model's natural choice shifted, (e + 1) mod E), keeps the router's
    own on the prompt's rows of -1, and records what it used, as the torch backend does."""
    model = build_model(untied=args.untied)
    algo = AlgorithmConfig(advantage="grpo", moe=MoEConfig(routing_replay="rollout"))
    trainer = TrainerConfig(lr=LR, steps=10, megatron=_layout(args))
    megatron = MegatronBackend(model.config, dict(model.hf_state_dict()), trainer, algo)
    torch_backend = TorchBackend(model, TrainerConfig(lr=LR, steps=10), algo)
    experts = model.config.n_routed_experts

    def probe() -> list[PackedBatch]:
        groups = episode_groups(model.config.vocab_size, 2, seed=11)
        return build_rl_step(groups, micro_batch_tokens=64).micro_batches

    natural_batches = probe()
    natural = torch_backend.logprobs(natural_batches)  # no engine rows: its own, captured
    mg_batches, torch_batches = probe(), probe()
    for nat, mg, tb in zip(natural_batches, mg_batches, torch_batches):
        engine = ((nat.routed_experts + 1) % experts).sort(dim=-1).values
        pos = torch.arange(nat.num_tokens) - nat.cu_seqlens[nat.seq_ids]
        engine[:, pos < nat.prompt_lens[nat.seq_ids]] = -1  # the prompt: the trainer's own
        mg.routed_experts, tb.routed_experts = engine.clone(), engine.clone()
    mg_logprobs = megatron.logprobs(mg_batches)
    torch_r3 = torch_backend.logprobs(torch_batches)
    return {
        "r3_logprob_max_diff": max_diff(mg_logprobs, torch_r3),
        "r3_routed_equal": all(
            torch.equal(a.routed_experts, b.routed_experts)
            for a, b in zip(mg_batches, torch_batches)
        ),
        "r3_no_free_rows": all(bool((b.routed_experts >= 0).all()) for b in mg_batches),
        "r3_vs_natural": max_diff(torch_r3, natural),
    }
