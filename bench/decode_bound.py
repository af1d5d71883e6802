"""Batch-1 decode of the embedded engine against the memory-bandwidth bound, in one run.

At batch 1 a decode step reads every weight it multiplies once (all attention and dense
weights, the shared experts, the router, the top-k routed experts of each MoE layer, the
LM head; one row of the embedding) and does little arithmetic per byte, so its floor is

    bound (s/token) = weight bytes read per token / memory bandwidth

with the bandwidth measured here, now, by a large torch tensor copy (bytes read + bytes
written per second: STREAM's "copy" convention; a read-only sum is printed too). The model is
the `small-36M` shape of bench/lora_vs_full.py (>= 30M parameters). The engine's decode time
per token is the difference between two greedy requests of different lengths (same prompt,
EOS ignored), so the prefill cancels out; the two are alternated --reps times and the best
of each is used. `--clock cpu` (the default) times both the engine and the copy with this
process's CPU clock, so a machine shared with other jobs slows neither side's figure by
descheduling it (the engine thread is the only busy thread; the caller waits in epoll).

    .venv/bin/python bench/decode_bound.py [--threads 1] [--dtype float32|bfloat16] [--reps 5]
        [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from models import decode_one_native as native  # noqa: E402
from models.config import get_preset  # noqa: E402
from models.decode_one import warm  # noqa: E402
from models.glm4moe import Glm4MoeForCausalLM  # noqa: E402
from rollout.embedded import EmbeddedEngine  # noqa: E402
from rollout.types import GenerateRequest, SamplingParams  # noqa: E402

# bench/lora_vs_full.py's "small-36M" (kept in step by hand, as bench/weight_sync.py does)
SMALL_36M: dict[str, Any] = dict(
    hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    n_routed_experts=16,
)  # fmt: skip
VOCAB = 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.process_time


def weight_bytes_per_token(model: Glm4MoeForCausalLM) -> tuple[int, int]:
    """(bytes read by one batch-1 decode step, bytes of all weights). Routed experts count
    k of E per MoE layer; the embedding counts one row unless tied to the LM head, which
    reads it whole."""
    c = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    read = total
    for layer in model.model.layers:
        if layer.is_moe:
            bank = sum(p.numel() * p.element_size() for p in layer.mlp.experts.parameters())
            read -= bank * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
    embed = model.model.embed_tokens.weight
    if embed.data_ptr() != model.lm_head.weight.data_ptr():  # untied: one row of it is read
        read -= embed.numel() * embed.element_size() * (embed.shape[0] - 1) // embed.shape[0]
    return read, total


def copy_bandwidth(nbytes: int, reps: int) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read-only GB/s of a sum), best of `reps`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)  # both touched before timing: no page faults in the loop
    best_copy = best_sum = float("inf")
    for _ in range(reps):
        start = clock()
        dst.copy_(src)
        best_copy = min(best_copy, clock() - start)
        start = clock()
        src.sum()
        best_sum = min(best_sum, clock() - start)
    return 2 * nbytes / best_copy / 1e9, nbytes / best_sum / 1e9


def gemv_bandwidth(reps: int) -> tuple[float, float]:
    """GB/s of one-row GEMVs over 48 MiB of [3072, 512] fp32 weights (out of cache), with
    the weights stored [out, in] (F.linear, the nn.Linear layout) and stored [in, out]
    (`x @ w`, the layout models/decode.py keeps on the CPU); best of `reps`."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(3072, 512, generator=gen) for _ in range(8)]
    in_out = [w.t().contiguous() for w in weights]
    x = torch.randn(1, 512, generator=gen)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    best_linear = best_in_out = float("inf")
    for _ in range(reps):
        start = clock()
        for w in weights:
            torch.nn.functional.linear(x, w)
        best_linear = min(best_linear, clock() - start)
        start = clock()
        for w in in_out:
            x @ w
        best_in_out = min(best_in_out, clock() - start)
    return nbytes / best_linear / 1e9, nbytes / best_in_out / 1e9


def _gemv(dtype: torch.dtype) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """(name, x [1, k] @ w [k, n]) as the engine's one-token layers run it: the C kernel of
    models/decode_one_native.py where it runs (fp32, one thread), else torch's matmul after
    the sum that reads a narrow matrix first (models/decode_one.py)."""
    lib = native.load()
    if lib is None or dtype != torch.float32 or torch.get_num_threads() != 1:
        return "torch", lambda x, w: x @ warm(w)
    outs: dict[int, torch.Tensor] = {}  # y += x @ w into one buffer per width, as x += ...

    def kernel(x: torch.Tensor, w: torch.Tensor) -> None:
        k, n = w.shape
        out = outs.setdefault(n, torch.zeros(1, n))
        lib.gemv_add(x.data_ptr(), w.data_ptr(), out.data_ptr(), k, n, 1.0)

    return "C kernel", kernel


def gemv_step_s(model: Glm4MoeForCausalLM, reps: int) -> tuple[float, int]:
    """(best CPU-or-wall seconds, matmul count) of one batch-1 token's weight matmuls alone:
    the engine's own decode weights (models/decode.py), in the step's order, two routed
    experts per MoE layer (changing from pass to pass, as routing does), the LM head (a torch
    matmul, as in the engine); each by the engine's GEMV (_gemv). Each pass reads the same
    bytes as a decode step, so the weights are as cold."""
    weights = model.decode_weights()
    c = model.config
    dtype = weights.embed.dtype
    _, gemv = _gemv(dtype)
    vec = {n: torch.randn(1, n, dtype=dtype) for n in {w.shape[0] for w in _matrices(weights)}}
    vec[c.hidden_size] = torch.randn(1, c.hidden_size, dtype=dtype)

    def one_pass(token: int) -> int:
        calls = 0
        for w in weights.layers:
            mats = [w.qkv, w.o]
            if w.gate_up is not None:
                mats += [w.gate_up, w.down]
            if w.experts_gate_up is not None:
                e = w.experts_gate_up.shape[0]
                for j in (token % e, (token + 1 + token // e) % e):
                    mats += [w.experts_gate_up[j], w.experts_down[j]]
                torch.nn.functional.linear(vec[c.hidden_size].float(), w.router_w)
                calls += 1
            for m in mats:
                gemv(vec[m.shape[0]], m)
            calls += len(mats)
        vec[c.hidden_size] @ warm(weights.lm_head)  # [H, V]
        return calls + 1

    passes = 16
    best, calls = float("inf"), 0
    one_pass(0)
    for _ in range(reps):
        start = clock()
        for t in range(passes):
            calls = one_pass(t)
        best = min(best, (clock() - start) / passes)
    return best, calls


def gemv_rates(model: Glm4MoeForCausalLM, reps: int) -> dict[tuple[int, int], float]:
    """GB/s of a one-row GEMV (the engine's, _gemv) at each distinct decode-weight shape, out
    of cache: enough random copies of the shape to pass 64 MB, each read once per pass;
    best of `reps`."""
    dtype = model.decode_weights().embed.dtype
    _, gemv = _gemv(dtype)
    shapes = sorted({tuple(m.shape) for m in _matrices(model.decode_weights())})
    rates = {}
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        nbytes = k * n * torch.finfo(dtype).bits // 8
        mats = [
            torch.randn(k, n, generator=gen).to(dtype) for _ in range(max(2, 64_000_000 // nbytes))
        ]
        x = torch.randn(1, k, generator=gen).to(dtype)
        best = float("inf")
        for _ in range(reps):
            start = clock()
            for m in mats:
                gemv(x, m)
            best = min(best, (clock() - start) / len(mats))
        rates[(k, n)] = nbytes / best / 1e9
    return rates


def _matrices(weights) -> list[torch.Tensor]:
    out = []
    for w in weights.layers:
        out += [m for m in (w.qkv, w.o, w.gate_up, w.down) if m is not None]
        if w.experts_gate_up is not None:
            out += [w.experts_gate_up[0], w.experts_down[0]]
    return out


def generate_s(engine: EmbeddedEngine, prompt: list[int], new: int) -> float:
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    start = clock()
    out = asyncio.run(engine.generate([GenerateRequest(prompt, params)]))
    elapsed = clock() - start
    if len(out[0].output_ids) != new:
        raise RuntimeError(f"expected {new} tokens, got {len(out[0].output_ids)}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--short", type=int, default=8, help="new tokens of the short request")
    ap.add_argument("--long", type=int, default=72, help="new tokens of the long request")
    ap.add_argument("--copy-mib", type=int, default=512, help="size of the copied tensor")
    ap.add_argument("--clock", default="cpu", choices=sorted(CLOCKS))
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if not 1 <= args.short < args.long:
        raise SystemExit(
            f"--short/--long: expected 1 <= short < long, got {args.short}, {args.long}"
        )
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=VOCAB, **SMALL_36M))
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().to_dtype(dtype)
    read, total = weight_bytes_per_token(model)
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(1, VOCAB, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = EmbeddedEngine(model, max_running=1, context_len=16 + args.long, eos_token_ids=[])
    try:
        generate_s(engine, prompt, args.short)  # warm-up: builds the fused decode weights
        shorts, longs, copies, sums = [], [], [], []
        for _ in range(args.reps):  # alternated, so both requests and the copy see one load
            shorts.append(generate_s(engine, prompt, args.short))
            longs.append(generate_s(engine, prompt, args.long))
            copy_gbs, sum_gbs = copy_bandwidth(args.copy_mib << 20, 3)
            copies.append(copy_gbs)
            sums.append(sum_gbs)
        gemv_linear, gemv_in_out = gemv_bandwidth(args.reps)
        with torch.inference_mode():
            gemv_s, gemv_calls = gemv_step_s(model, args.reps)
            rates = gemv_rates(model, 3)
    finally:
        engine.shutdown()
    per_token = (min(longs) - min(shorts)) / (args.long - args.short)
    bw = max(copies)
    bound = read / (bw * 1e9)
    print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load}, torch threads {torch.get_num_threads()}, {args.clock} clock")
    print(f"model small-36M: {params / 1e6:.1f}M parameters, {args.dtype}, {total / 1e6:.1f} MB")
    print(f"weight bytes read per token (batch 1): {read / 1e6:.1f} MB")
    print(
        f"bandwidth: tensor copy {bw:.1f} GB/s (read + write, {args.copy_mib} MiB), "
        f"read-only sum {max(sums):.1f} GB/s"
    )
    print(
        f"GEMV (1 row, 48 MiB fp32): weights [out, in] via F.linear {gemv_linear:.1f} GB/s, "
        f"[in, out] via x @ w {gemv_in_out:.1f} GB/s (the engine's layout on the CPU)"
    )
    print(f"bound at copy bandwidth  : {bound * 1e3:7.2f} ms/token")
    print(f"bound at read bandwidth  : {read / (max(sums) * 1e9) * 1e3:7.2f} ms/token")
    print(
        f"engine decode (batch 1)  : {per_token * 1e3:7.2f} ms/token "
        f"({1 / per_token:.1f} tok/s; {args.long} - {args.short} new tokens, best of {args.reps})"
    )
    print(f"engine / copy bound      : {per_token / bound:7.2f}x   (target <= 2x)")
    print(
        f"the step's {gemv_calls} weight matmuls alone (engine's weights, same order, best of "
        f"{args.reps}): {gemv_s * 1e3:.2f} ms/token = {gemv_s / bound:.2f}x the copy bound, "
        f"{read / gemv_s / 1e9:.1f} GB/s; the rest of the engine's step: "
        f"{(per_token - gemv_s) * 1e3:.2f} ms/token"
    )
    shapes = ", ".join(f"[{k}, {n}] {gbs:.1f}" for (k, n), gbs in rates.items())
    kernel = _gemv(dtype)[0]
    print(f"one-row GEMV ({kernel}) by weight shape [in, out], out of cache, GB/s: {shapes}")


if __name__ == "__main__":
    main()
