"""Training throughput of the torch backend on the toy GLM-4 MoE, against a transformers peer.

1. GRPO train step for TRL's batch shape (8 prompts x 8 samples, short arithmetic answers):
   ours = `TorchBackend.train(step)` (advantages, packed forward/backward with the chunked
   logprobs, AdamW, MoE bias update, metrics); peer = what TRL's GRPOTrainer does per step
   with transformers' Glm4MoeForCausalLM on the SAME weights and tokens: a right-padded
   [B, S] forward, full logits, log_softmax + gather, the DAPO clipped loss, backward, AdamW.
   Both timed in this process, interleaved, median of --repeats steps after warm-up; wall
   time and this process's CPU time (at 1 thread on a busy machine, CPU time is close to what
   an idle machine's wall time would be).
2. SFT train tokens/s at two micro-batch token budgets (--budgets), --sft-seqs sequences/step.

TRL's own figures on this machine (reference/trl_baseline.md, not re-measured here): GRPO step
0.130 s (generation 0.045 s, training 0.080 s), 8,328 trained tokens/s.

    .venv/bin/python bench/trainer_throughput.py [--threads 2] [--repeats 20]
    .venv/bin/python bench/trainer_throughput.py --profile   # + where one step's time goes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from configs import AlgorithmConfig, TrainerConfig
from envs.tasks import make_rows, tokenizer_corpus
from models import Glm4MoeForCausalLM, get_preset
from models.tokenizer import build_toy_tokenizer
from trainer.batch import StepBatch, build_rl_step, build_step
from trainer.sft_data import sft_episodes
from trainer.torch_backend import TorchBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
from tests.trainer.toy import arithmetic_groups  # noqa: E402  (the suite's toy GRPO groups)

TRL_STEP_S, TRL_TRAIN_S, TRL_TOKENS_PER_S = 0.130, 0.080, 8328


def hf_peer(ours: Glm4MoeForCausalLM) -> torch.nn.Module:
    """transformers' Glm4MoeForCausalLM holding a copy of our weights."""
    config = transformers.Glm4MoeConfig.from_dict(ours.config.to_hf_dict())
    hf = transformers.Glm4MoeForCausalLM(config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return hf.train()


def padded_inputs(step: StepBatch) -> dict[str, torch.Tensor]:
    """Right-padded [B, S] ids, attention mask, completion mask and advantages of the step."""
    rows, masks, advs = [], [], []
    for batch in step.micro_batches:
        for b in range(batch.num_seqs):
            lo, hi = int(batch.cu_seqlens[b]), int(batch.cu_seqlens[b + 1])
            rows.append(batch.input_ids[lo:hi])
            masks.append(batch.loss_mask[lo:hi])
            advs.append(batch.advantages[lo:hi])
    width = max(len(r) for r in rows)

    def pad(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in xs])

    attention = pad([torch.ones_like(r) for r in rows])
    return {"ids": pad(rows), "attention": attention, "mask": pad(masks), "adv": pad(advs)}


def hf_grpo_step(hf: torch.nn.Module, opt: torch.optim.Optimizer, inp: dict) -> float:
    """One TRL-style GRPO training step (num_iterations 1: old logprobs = detached current)."""
    t0 = time.perf_counter()
    logits = hf(input_ids=inp["ids"], attention_mask=inp["attention"]).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, inp["ids"][:, 1:, None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    adv, mask = inp["adv"][:, 1:], inp["mask"][:, 1:]
    loss_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    loss = (loss_tok * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t0


def model_forward_backward(model: Glm4MoeForCausalLM, step: StepBatch) -> float:
    """Wall time of the model's packed token_logprobs forward + backward on the step."""
    t0 = time.perf_counter()
    for batch in step.micro_batches:
        out = model.token_logprobs(batch.input_ids, batch.cu_seqlens, with_entropy=True)
        (out.logprobs * batch.loss_mask).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def profile_steps(backend: TorchBackend, hf: torch.nn.Module, opt, groups, cfg) -> None:
    """torch.profiler over one GRPO step of each side: the top ops by self CPU time and the
    share of the step spent in Python outside any op (dispatch and framework overhead)."""
    from torch.profiler import ProfilerActivity, profile

    for name, run in (
        ("ours", lambda step: backend.train(step)),
        ("peer", lambda step: hf_grpo_step(hf, opt, padded_inputs(step))),
    ):
        step = build_rl_step(groups, micro_batch_tokens=cfg.micro_batch_tokens)
        if name == "peer":
            backend.prepare(step)  # the peer reads our advantages
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(step)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        ops = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"\nprofile, {name}: one step {wall * 1e3:.1f} ms under the profiler, "
              f"{ops * 1e3:.1f} ms in ops ({ops / wall:.0%}), the rest Python")  # fmt: skip
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=44))


def grpo_bench(tok, ours: Glm4MoeForCausalLM, repeats: int, profile: bool = False) -> None:
    groups = arithmetic_groups(tok, n_prompts=8, n_samples=8, seed=0)
    cfg = TrainerConfig(lr=1e-4, micro_batch_tokens=4096, steps=10**6)
    backend = TorchBackend(ours, cfg, AlgorithmConfig(advantage="grpo", loss_agg="token_mean"))
    hf = hf_peer(ours)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)
    ours_s, peer_s, model_s, ours_cpu, peer_cpu = [], [], [], [], []
    for i in range(repeats + 3):
        step = build_rl_step(groups, micro_batch_tokens=cfg.micro_batch_tokens)
        t0, c0 = time.perf_counter(), time.process_time()
        backend.train(step)
        ours_time, ours_c = time.perf_counter() - t0, time.process_time() - c0
        inputs = padded_inputs(step)
        c0 = time.process_time()
        peer_time = hf_grpo_step(hf, opt, inputs)
        peer_c = time.process_time() - c0
        model_time = model_forward_backward(ours, step)
        if i >= 3:
            ours_s.append(ours_time)
            peer_s.append(peer_time)
            model_s.append(model_time)
            ours_cpu.append(ours_c)
            peer_cpu.append(peer_c)
    if profile:
        profile_steps(backend, hf, opt, groups, cfg)
    tokens = sum(b.num_tokens for b in step.micro_batches)
    completion = sum(int(b.loss_mask.sum()) for b in step.micro_batches) / step.num_seqs
    ours_med, peer_med = statistics.median(ours_s), statistics.median(peer_s)
    print(f"GRPO step, 8 prompts x 8 samples: {tokens} tokens, {completion:.2f} completion "
          f"tokens/seq (TRL: ~3.5)")  # fmt: skip
    for name, med, cpu in (("ours (TorchBackend.train)    ", ours_med, ours_cpu),
                           ("peer (transformers, TRL-like)", peer_med, peer_cpu)):  # fmt: skip
        cpu_med = statistics.median(cpu)
        print(f"  {name} wall {med * 1e3:7.1f} ms ({tokens / med:6.0f} tok/s)   "
              f"cpu {cpu_med * 1e3:7.1f} ms ({tokens / cpu_med:6.0f} tok/s)")  # fmt: skip
    print(f"  speed-up vs the peer: {peer_med / ours_med:.2f}x")
    model_med = statistics.median(model_s)
    print(f"  of which the model's packed forward+backward alone: {model_med * 1e3:.1f} ms "
          f"({model_med / ours_med:.0%} of our step)")  # fmt: skip
    shared = sum(len(g.episodes[0].prompt_ids) + sum(len(e.response_ids) for e in g.episodes)
                 for g in groups)  # fmt: skip
    print(f"  tokens if each group's prompt were computed once (prefix sharing): {shared} "
          f"({tokens / shared:.1f}x fewer)")  # fmt: skip
    print(f"  TRL reference (training part) {TRL_TRAIN_S * 1e3:8.1f} ms  -> ours is "
          f"{TRL_TRAIN_S / ours_med:.2f}x; whole TRL step {TRL_STEP_S * 1e3:.0f} ms")  # fmt: skip


def sft_bench(tok, vocab: int, budgets: list[int], n_seqs: int, repeats: int) -> None:
    rows = make_rows("arithmetic", n_seqs, seed=0, split="train")
    episodes = sft_episodes(tok, rows)
    for budget in budgets:
        torch.manual_seed(0)
        model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=vocab))
        cfg = TrainerConfig(lr=1e-3, micro_batch_tokens=budget, steps=10**6)
        backend = TorchBackend(model, cfg, AlgorithmConfig(), policy_loss="sft")
        step = build_step(episodes, list(range(n_seqs)), micro_batch_tokens=budget)
        times, cpus = [], []
        for i in range(repeats + 2):
            t0, c0 = time.perf_counter(), time.process_time()
            backend.train_step(step.micro_batches)
            if i >= 2:
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        tokens = sum(b.num_tokens for b in step.micro_batches)
        med, cpu = statistics.median(times), statistics.median(cpus)
        print(f"SFT micro_batch_tokens={budget:5d}: {len(step.micro_batches):3d} micro-batches, "
              f"{tokens} tokens/step: wall {med * 1e3:7.1f} ms ({tokens / med:6.0f} tok/s), "
              f"cpu {cpu * 1e3:7.1f} ms ({tokens / cpu:6.0f} tok/s)")  # fmt: skip
    print(f"  (TRL reference, idle machine: SFT 9,586 tok/s, GRPO {TRL_TOKENS_PER_S:,} tok/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budgets", type=int, nargs=2, default=[256, 4096])
    ap.add_argument("--sft-seqs", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="profile one GRPO step per side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_toy_tokenizer(tempfile.mkdtemp(prefix="tok-"), tokenizer_corpus(500))
    torch.manual_seed(0)
    ours = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=len(tok)))
    print(f"torch {torch.__version__}, {args.threads} threads, toy model vocab {len(tok)}")
    grpo_bench(tok, ours, args.repeats, args.profile)
    sft_bench(tok, len(tok), args.budgets, args.sft_seqs, max(3, args.repeats // 4))


if __name__ == "__main__":
    main()
