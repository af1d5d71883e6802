"""The bf16 trainer on a compute-bound shape, against this machine's measured matmul peak.

trainer.dtype bfloat16 is mixed precision: every matmul (dense layers, attention, the routed
experts' grouped GEMMs, lm_head forward and backward) runs in bf16, while the master weights,
gradients, AdamW state and the loss's logprobs stay fp32. This script measures, in one run:

1. the matmul peak of this machine at the torch thread count used: a [N, N] @ [N, N] product
   (--peak-n, default 2048) in bf16 and in fp32, best of --reps;
2. one SFT train step (`TorchBackend.train_step`, forward + backward + AdamW) of a ~40M
   parameter GLM-4 MoE (hidden 512, 4 layers, 16 experts top-2, vocab 8192) on
   --seqs sequences of --seq-len tokens, in fp32 and in bf16, alternated --reps times;
3. the achieved GFLOP/s of that step: useful FLOPs = 6 x active params x tokens (the trunk)
   + 6 x vocab x hidden x trained tokens (lm_head) + 6 x layers x seq_len^2 x heads x head_dim
   per sequence (causal attention: half of the 12 s^2 d of forward + backward). lm_head's
   logit recompute in the backward (2 x vocab x hidden per token) is work we do but not counted.

    .venv/bin/python bench/trainer_bf16.py                 # ~2 min on a quiet machine
    .venv/bin/python bench/trainer_bf16.py --threads 2 --profile
    .venv/bin/python bench/trainer_bf16.py --shape toy --seqs 64 --seq-len 17  # e2e's model
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import numpy as np
import torch

from buffer.episode import Episode
from configs import AlgorithmConfig, TrainerConfig
from models import Glm4MoeForCausalLM, get_preset
from models.config import ModelConfig, count_params
from trainer.batch import StepBatch, build_step
from trainer.torch_backend import TorchBackend

SHAPE_40M = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    n_routed_experts=16, num_experts_per_tok=2, max_position_embeddings=4096,
)  # fmt: skip
SHAPES = {"40m": SHAPE_40M, "toy": {}}  # toy: glm4moe-toy itself (1.8M, the e2e model)


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> tuple[float, float]:
    """Best GFLOP/s of an [n, n] @ [n, n] product in dtype, by wall clock and by this
    thread's CPU time (the one a shared machine distorts less)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        a @ b
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.thread_time() - c0)
    return 2 * n**3 / best / 1e9, 2 * n**3 / best_cpu / 1e9


def sft_step(config: ModelConfig, seqs: int, seq_len: int) -> StepBatch:
    """seqs random sequences of seq_len tokens: a 16-token prompt, the rest trained."""
    rng = np.random.default_rng(0)
    prompt, response = 16, seq_len - 16
    episodes = [
        Episode(
            prompt_ids=rng.integers(0, config.vocab_size, prompt),
            response_ids=rng.integers(0, config.vocab_size, response),
            loss_mask=np.ones(response, np.float32),
            rollout_logprobs=np.zeros(response, np.float32),
            versions=np.full(response, -1),
        )
        for _ in range(seqs)
    ]
    return build_step(episodes, list(range(seqs)), micro_batch_tokens=seqs * seq_len)


def step_flops(config: ModelConfig, step: StepBatch, seq_len: int) -> float:
    """Useful FLOPs of one train step (see the module docstring)."""
    _, active = count_params(config)
    tokens = sum(b.num_tokens for b in step.micro_batches)
    trained = sum(float(b.loss_mask.sum()) for b in step.micro_batches)
    d_attn = config.num_attention_heads * config.head_dim
    attention = 6 * config.num_hidden_layers * seq_len**2 * d_attn * step.num_seqs
    return 6 * active * tokens + 6 * config.vocab_size * config.hidden_size * trained + attention


def make_backend(config: ModelConfig, dtype: str) -> TorchBackend:
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    cfg = TrainerConfig(dtype=dtype, lr=1e-4, micro_batch_tokens=1 << 16, steps=10**6)
    return TorchBackend(model, cfg, AlgorithmConfig(), policy_loss="sft")


def profile_step(backend: TorchBackend, step: StepBatch) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.train_step(step.micro_batches)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="alternations of fp32 / bf16 steps")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="40m")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="top ops of one bf16 step")
    args = ap.parse_args()
    if args.seq_len <= 16:
        raise SystemExit(f"--seq-len: expected > 16 (a 16-token prompt), got {args.seq_len}")
    torch.set_num_threads(args.threads)
    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    print(f"trainer_bf16: {now}, load average {os.getloadavg()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    config = get_preset("glm4moe-toy", **SHAPES[args.shape])
    total, active = count_params(config)
    step = sft_step(config, args.seqs, args.seq_len)
    flops = step_flops(config, step, args.seq_len)
    print(f"model: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active; step: "
          f"{args.seqs} x {args.seq_len} tokens, {flops / 1e9:.1f} GFLOP counted")  # fmt: skip
    backends = {d: make_backend(config, d) for d in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {d: [] for d in backends}
    cpu: dict[str, list[float]] = {d: [] for d in backends}  # this thread's CPU seconds
    peaks: dict[str, list[float]] = {d: [] for d in backends}
    cpu_peaks: dict[str, list[float]] = {d: [] for d in backends}
    for b in backends.values():  # warm-up: allocations, AdamW state
        b.train_step(step.micro_batches)
    for _ in range(args.reps):  # alternate the sides and re-measure the peak beside them
        for d, b in backends.items():
            peak, cpu_peak = matmul_peak(getattr(torch, d), args.peak_n, 3)
            peaks[d].append(peak)
            cpu_peaks[d].append(cpu_peak)
            t0, c0 = time.perf_counter(), time.thread_time()
            b.train_step(step.micro_batches)
            times[d].append(time.perf_counter() - t0)
            cpu[d].append(time.thread_time() - c0)
    # of peak: by wall clock (the figure). cpu s: the step's CPU time on this thread,
    # and "cpu of peak" the same ratio with the step and the peak both timed by CPU time: on a
    # shared machine wall - cpu is the time the step waited for a core
    print(f"\n{'dtype':<10}{'step s':>9}{'GFLOP/s':>9}{'mm peak':>9}{'of peak':>9}"
          f"{'cpu s':>9}{'cpu peak':>9}{'cpu of peak':>12}")  # fmt: skip
    for d in backends:
        step_s, peak = statistics.median(times[d]), max(peaks[d])
        cpu_s, cpu_peak = statistics.median(cpu[d]), max(cpu_peaks[d])
        achieved = flops / step_s / 1e9
        print(f"{d:<10}{step_s:>9.3f}{achieved:>9.1f}{peak:>9.1f}{achieved / peak:>9.0%}"
              f"{cpu_s:>9.3f}{cpu_peak:>9.1f}{flops / cpu_s / 1e9 / cpu_peak:>12.0%}")  # fmt: skip
    speedup = statistics.median(times["float32"]) / statistics.median(times["bfloat16"])
    print(f"bf16 step speed-up over fp32: {speedup:.2f}x (peak ratio "
          f"{max(peaks['bfloat16']) / max(peaks['float32']):.2f}x); load average now "
          f"{os.getloadavg()}")  # fmt: skip
    if args.profile:
        profile_step(backends["bfloat16"], step)


if __name__ == "__main__":
    main()
