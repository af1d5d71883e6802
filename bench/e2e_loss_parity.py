"""One GRPO step on identical episodes: TRL's GRPOTrainer against Physarum's TorchBackend.

The held-out accuracy gap of bench/e2e_vs_trl.py has a cause somewhere between the episodes
and the weights. This script removes sampling from the comparison: TRL generates and scores
one step's 64 completions (8 prompts x 8, its own `_generate_and_score_completions`), and
both sides then train on exactly those completions and rewards from the same warm start:

  TRL   GRPOTrainer.compute_loss (loss_type "dapo", epsilon 0.2 / 0.28, beta 0), backward,
        its own optimizer and scheduler (create_optimizer_and_scheduler), clip 1.0, one step;
  ours  the preset configs/toy_grpo.yaml with bench/e2e_vs_trl.py's overrides (TorchBackend,
        trainer.share_prompt_prefix, TIS with rollout logprobs = the sampling policy's),
        prepare (old logprobs, advantages), the actor pass, clip, one AdamW step.

Printed: per-sample advantages (max |diff|), per-token logprobs, the loss, the gradient
(global cosine and norm ratio; per parameter the worst cosine, norm ratio and max |diff|),
the optimizer's settings and lr schedule on each side, and the update (weights after the
step) compared the same way.

    .venv/bin/python bench/e2e_loss_parity.py --warm-start runs/bench_e2e_vs_trl/warm_start
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import build_fixture  # bench/common.py: the script's own directory is on sys.path
from e2e_trl_side import (
    PROMPTS,
    SAMPLES,
    grpo_args,
    require_trl,
    trl_dataset,
    trl_reward,
    trl_tokenizer,
)
from e2e_vs_trl import ours_overrides

import configs
from buffer.episode import Episode, EpisodeGroup, FinishReason
from configs import load_job
from models.checkpoint import from_pretrained
from models.tokenizer import stop_token_ids
from trainer.batch import build_rl_step, to_padded
from trainer.torch_backend import TorchBackend


def trl_step_inputs(trainer: Any, dataset: Any, seed: int) -> dict[str, Any]:
    """TRL's own batch for one step: 8 prompts x 8 completions, generated and scored."""
    rows = [dataset[i] for i in range(PROMPTS)]
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions([r for r in rows for _ in range(SAMPLES)])


def episodes_from_trl(batch: dict[str, Any], tok: Any, labels: list[str]) -> list[EpisodeGroup]:
    """The same completions as Physarum episode groups, rewards recomputed by the reward."""
    stops = set(stop_token_ids(tok))
    groups: list[EpisodeGroup] = []
    for g in range(PROMPTS):
        episodes = []
        for i in range(g * SAMPLES, (g + 1) * SAMPLES):
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
            response = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
            text = tok.decode(response, skip_special_tokens=True)
            reward = trl_reward([[{"content": text}]], [labels[i]])[0]
            n = len(response)
            finish = FinishReason.STOP if response[-1] in stops else FinishReason.LENGTH
            episodes.append(
                Episode(prompt, response, np.ones(n), np.zeros(n), np.zeros(n), reward=reward,
                        finish_reason=finish)
            )  # fmt: skip
        groups.append(EpisodeGroup(f"g{g}", episodes))
    return groups


def compare(name: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Global cosine and norm ratio of b vs a, and per tensor the worst ones."""
    if set(a) != set(b):
        print(f"{name}: names differ: only TRL {set(a) - set(b)}, only ours {set(b) - set(a)}")
    names = sorted(set(a) & set(b))
    va = torch.cat([a[n].flatten().double() for n in names])
    vb = torch.cat([b[n].flatten().double() for n in names])
    cos = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
    print(
        f"{name}: global cosine {cos:.6f}, |ours|/|TRL| {float(vb.norm() / va.norm()):.6f}, "
        f"max |diff| {float((va - vb).abs().max()):.3e} (max |TRL| {float(va.abs().max()):.3e})"
    )
    rows = []
    for n in names:
        x, y = a[n].flatten().double(), b[n].flatten().double()
        c = float(torch.nn.functional.cosine_similarity(x, y, dim=0)) if x.norm() > 0 else 1.0
        rows.append((c, float(y.norm() / x.norm().clamp_min(1e-30)), float((x - y).abs().max()), n))
    rows.sort()
    for c, ratio, diff, n in rows[:5]:
        print(f"    worst: {n:55s} cosine {c:.6f} norm ratio {ratio:.6f} max |diff| {diff:.3e}")


def run_trl_side(trainer: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Loss, grads, lr schedule and the weights after one optimizer step, on TRL's batch."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets (no accumulation)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=batch["num_items_in_batch"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    opt = trainer.optimizer
    group = opt.param_groups[0]
    settings = {k: group.get(k) for k in ("lr", "betas", "eps", "weight_decay", "fused")}
    settings["class"] = type(opt).__name__
    settings["groups_weight_decay"] = [g["weight_decay"] for g in opt.param_groups]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    opt.step()
    lrs = [trainer.lr_scheduler.get_last_lr()[0]]
    for _ in range(3):
        trainer.lr_scheduler.step()
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": float(loss), "grads": grads, "norm": float(norm), "opt": settings,
            "lrs": lrs, "after": after}  # fmt: skip


def run_our_side(job: Any, warm: Path, groups: list[EpisodeGroup], seed: int) -> dict[str, Any]:
    """Advantages, logprobs, loss, grads and the weights after one step of TorchBackend."""
    model = from_pretrained(warm)
    tb = TorchBackend(model, job.trainer, job.algorithm, seed=seed)
    step = build_rl_step(
        groups, micro_batch_tokens=job.trainer.micro_batch_tokens, temperature=1.0,
        current_version=0, mask_truncated=job.algorithm.overlong_filter,
        share_prompt_prefix=job.trainer.share_prompt_prefix,
    )  # fmt: skip
    # The sampling policy is the warm start itself: its logprobs are the rollout logprobs.
    for b, logp in zip(step.micro_batches, tb.logprobs(step.micro_batches), strict=True):
        b.rollout_logprobs = logp * b.loss_mask
    width = max(len(e.response_ids) for g in groups for e in g.episodes)
    batches = tb.prepare(step)
    n = step.num_seqs
    adv = to_padded(batches, [b.advantages for b in batches], n, width)[:, 0]
    logp = to_padded(batches, tb.logprobs(batches), n, width)
    tb.model.train()
    tb.optimizer.zero_grad(set_to_none=True)
    stats, _ = tb._actor_pass(batches, tb.objective)
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    norm = tb._optimizer_step(tb._trainable, tb.optimizer, tb.scheduler)
    group = tb.optimizer.param_groups[0]
    settings = {k: group.get(k) for k in ("lr", "betas", "eps", "weight_decay", "fused")}
    settings["class"] = type(tb.optimizer).__name__
    lrs = [tb.scheduler.get_last_lr()[0]]
    for _ in range(2):
        tb.scheduler.step()
        lrs.append(tb.scheduler.get_last_lr()[0])
    metrics = stats.finalize()
    after = {k: p.detach().clone() for k, p in model.named_parameters()}
    return {"adv": adv, "logp": logp, "loss": metrics["loss"], "grads": grads, "norm": norm,
            "opt": settings, "lrs": lrs, "after": after, "metrics": metrics}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-start", type=Path, required=True, help="an HF dir (the SFT)")
    parser.add_argument("--root", type=Path, default=Path("runs/bench_e2e_loss_parity"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="an extra override of our job (after bench/e2e_vs_trl.py's)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_trl("e2e_loss_parity.py")
    torch.set_num_threads(1)
    print(
        f"e2e_loss_parity: {datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
        f"{os.getloadavg()}, torch threads {torch.get_num_threads()}"
    )
    from trl import GRPOTrainer

    fixture = build_fixture(
        args.root / "fixture", n_train=args.n_train, n_eval=args.n_eval, seed=args.seed
    )
    tok = trl_tokenizer(fixture)
    dataset = trl_dataset(fixture, tok)
    trainer = GRPOTrainer(
        model=str(args.warm_start), reward_funcs=trl_reward,
        args=grpo_args(args.root / "trl", steps=100, seed=args.seed),
        train_dataset=dataset, processing_class=tok,
    )  # fmt: skip
    batch = trl_step_inputs(trainer, dataset, args.seed)
    labels = [dataset[i]["label"] for i in range(PROMPTS) for _ in range(SAMPLES)]
    groups = episodes_from_trl(batch, tok, labels)
    rewards = torch.tensor([e.reward for g in groups for e in g.episodes])
    lengths = batch["completion_mask"].sum(1)
    print(
        f"episodes: {len(rewards)} completions, mean reward {float(rewards.mean()):.3f}, "
        f"tokens {int(lengths.sum())}, truncated (no stop token) "
        f"{sum(e.finish_reason == FinishReason.LENGTH for g in groups for e in g.episodes)}"
    )
    preset = Path(configs.__file__).parent / "toy_grpo.yaml"
    overrides = ours_overrides(fixture, args.warm_start, args.root / "ours", steps=100,
                               staleness=0, seed=args.seed, extra=tuple(args.sets))  # fmt: skip
    job = load_job(preset, overrides)
    print(f"ours: algorithm {job.algorithm.model_dump(exclude={'rejection_sampling'})}")
    trl_logp = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
        batch["completion_ids"].size(1),
    )[0].detach()
    trl = run_trl_side(trainer, batch)
    ours = run_our_side(job, args.warm_start, groups, args.seed)

    trl_adv = batch["advantages"].float()
    mask = batch["completion_mask"].bool()
    width = ours["logp"].shape[1]
    print(f"advantages: max |ours - TRL| {float((ours['adv'] - trl_adv).abs().max()):.3e} "
          f"(TRL range {float(trl_adv.min()):.3f}..{float(trl_adv.max()):.3f})")  # fmt: skip
    dl = (ours["logp"] - trl_logp[:, :width])[mask[:, :width]]
    print(f"token logprobs: max |ours - TRL| {float(dl.abs().max()):.3e} over {dl.numel()} tokens")
    print(f"loss: TRL {trl['loss']:.8f}  ours {ours['loss']:.8f}")
    print(f"grad norm before clipping: TRL {trl['norm']:.6f}  ours {ours['norm']:.6f}")
    compare("gradient", trl["grads"], ours["grads"])
    print(f"optimizer TRL:  {trl['opt']}; lr over steps 0..3 {trl['lrs']}")
    print(f"optimizer ours: {ours['opt']}; lr over steps 0..2 {ours['lrs']}")
    warm_model = from_pretrained(args.warm_start)
    start = dict(warm_model.named_parameters())
    delta_trl = {n: t - start[n].detach() for n, t in trl["after"].items()}
    delta_ours = {n: t - start[n].detach() for n, t in ours["after"].items()}
    compare("update (weights after - before)", delta_trl, delta_ours)
    m = ours["metrics"]
    print(f"ours: tis_weight {m.get('tis_weight', 1.0):.6f}, clip_frac {m.get('clip_frac'):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
