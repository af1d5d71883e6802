"""Embedded engine vs transformers `generate`: tokens/s on the same weights and prompts.

Both run in this process on the same CPU threads. The model is the `glm4moe-toy` preset
(random init, std 0.2 so outputs are not degenerate), written with our `save_pretrained`
and loaded into transformers' own `Glm4MoeForCausalLM`. Default workload (issue 5): 64
prompts x 8 samples (--prompts, --samples; `--samples 1` is issue 19's batch 64), 32 new
tokens each, temperature 1, no top-k/top-p, EOS ignored so every sequence generates exactly
32 tokens. transformers gets all sequences in one left-padded `generate` call (its fastest
setting here; see --hf-chunks). Then the engine's absolute
tokens/s at batch 1, 16, 64 and 512 (n=1 requests, 32 new tokens, T=1).

    .venv/bin/python bench/engine_vs_hf.py [--threads 2] [--repeats 3] [--dtype float32]
    .venv/bin/python bench/engine_vs_hf.py --threads 1 --clock cpu   # on a shared, busy CPU
    .venv/bin/python bench/engine_vs_hf.py --threads 1 --clock cpu --samples 1  # batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import sys
import tempfile
import time

import torch

from models import Glm4MoeForCausalLM, get_preset, save_pretrained
from rollout.embedded import EmbeddedEngine
from rollout.types import GenerateRequest, SamplingParams

NEW_TOKENS = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(preset: str, seed: int = 0) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(get_preset(preset, initializer_range=0.2))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]


def hf_generate(
    hf_model,
    prompts: list[list[int]],
    samples: int,
    chunks: int,
    *,
    new_tokens: int = NEW_TOKENS,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    outputs: list[list[int]] | None = None,
) -> int:
    """transformers generate, left-padded; returns the number of generated tokens.
    temperature 0 = greedy; `outputs` (if given) receives each sequence's new tokens."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    total = 0
    per = (len(prompts) + chunks - 1) // chunks
    for start in range(0, len(prompts), per):
        part = prompts[start : start + per]
        width = max(len(p) for p in part)
        ids = torch.zeros(len(part), width, dtype=torch.int64)
        mask = torch.zeros(len(part), width, dtype=torch.int64)
        for i, p in enumerate(part):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                **sampling,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=samples,
                pad_token_id=0,
                eos_token_id=None,
            )
        total += (out.shape[1] - width) * out.shape[0]
        if outputs is not None:
            outputs.extend(out[:, width:].tolist())
    return total


def engine_generate(
    engine: EmbeddedEngine,
    prompts: list[list[int]],
    samples: int,
    *,
    new_tokens: int = NEW_TOKENS,
    temperature: float = 1.0,
    outputs: list[list[int]] | None = None,
) -> int:
    """The engine's generated token count (EOS ignored); `outputs` receives the tokens."""
    params = SamplingParams(
        max_new_tokens=new_tokens, temperature=temperature, n=samples, ignore_eos=True
    )
    outs = asyncio.run(engine.generate([GenerateRequest(p, params) for p in prompts]))
    if outputs is not None:
        outputs.extend(list(o.output_ids) for o in outs)
    return sum(len(o.output_ids) for o in outs)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, repeats: int, clock: str = "wall") -> tuple[float, int]:
    """Best-of-`repeats` time (wall clock, or CPU time of the whole process) and the token
    count of one call."""
    now = CLOCKS[clock]
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = now()
        tokens = fn()
        best = min(best, now() - start)
    return best, tokens


def print_floor(config, prompts: list[list[int]], args, t_eng: float, t_hf: float) -> None:
    """The workload's matmul FLOPs, this CPU's matmul rate on the model's shapes (measured
    now), and each side's best time as a multiple of FLOPs / peak (bench/matmul_floor.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also as bench.engine_vs_hf
    from matmul_floor import matmul_rates, workload_flops

    lens = [len(p) for p in prompts]
    flops = workload_flops(config, lens, NEW_TOKENS, args.samples)
    rows = sorted({args.prompts * args.samples, sum(lens)})
    print(
        f"matmul floor: {flops.total / 1e9:.3f} GFLOP of matmuls for the real tokens "
        f"(prefill {flops.prefill / 1e9:.3f} over {sum(lens) * args.samples} prompt tokens, "
        f"decode {flops.decode / 1e9:.3f} over {len(lens) * args.samples * (NEW_TOKENS - 1)} "
        "fed-back tokens; no padding; each prompt counted once per sample, as transformers "
        "computes it, while the engine prefills a prompt once for all its samples)"
    )
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        rates = matmul_rates(config, rows, dtype, args.peak_reps)
        (r, k, n), peak = max(rates.items(), key=lambda kv: kv[1])
        low = min(rates.values())
        floor = flops.total / (peak * 1e9)
        print(
            f"  {name} matmul rate on the model's shapes (rows {rows}, {len(rates)} shapes, "
            f"CPU clock): peak {peak:.1f} GFLOP/s at [{r}, {k}] @ [{k}, {n}], lowest {low:.1f}; "
            f"floor {floor * 1e3:.1f} ms"
        )
        if name == args.dtype:
            print(
                f"  engine {t_eng * 1e3:.1f} ms = {t_eng / floor:.2f}x the {name} floor; "
                f"transformers {t_hf * 1e3:.1f} ms = {t_hf / floor:.2f}x; 4x transformers "
                f"would be {t_hf / 4 * 1e3:.1f} ms = {t_hf / 4 / floor:.2f}x the floor "
                f"({args.clock} clock, best runs)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="glm4moe-toy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per run")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (n)")
    parser.add_argument(
        "--peak-reps", type=int, default=3, help="timings per matmul shape for the peak"
    )
    parser.add_argument("--hf-chunks", type=int, default=1, help="split HF's batch in chunks")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="both sides")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: elapsed time; cpu: CPU time of this process (robust when other jobs share "
        "the CPU; use with --threads 1, where no thread spins)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from transformers import Glm4MoeForCausalLM as HFGlm4Moe

    model = build_model(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf_model = HFGlm4Moe.from_pretrained(tmp, dtype=DTYPES[args.dtype]).eval()
        # a bf16 engine is also compared with transformers in fp32 (its faster dtype here)
        hf_fp32 = None
        if args.dtype != "float32":
            hf_fp32 = HFGlm4Moe.from_pretrained(tmp, dtype=torch.float32).eval()
    model.to_dtype(DTYPES[args.dtype])
    prompts = make_prompts(args.prompts, model.config.vocab_size)
    context = max(len(p) for p in prompts) + NEW_TOKENS
    engine = EmbeddedEngine(model, max_running=512, context_len=context, eos_token_ids=[])
    try:
        engine_generate(engine, prompts[:4], 2)  # warm-up
        hf_generate(hf_model, prompts[:4], 2, 1)
        if hf_fp32 is not None:
            hf_generate(hf_fp32, prompts[:4], 2, 1)
        times: list[tuple[float, float]] = []
        pairs = []  # interleaved runs: the CPU is shared, so compare runs made side by side
        fp32_rates: list[float] = []  # transformers fp32 in the same rounds (bf16 runs)
        for _ in range(args.repeats):
            t_eng, n_eng = timed(
                lambda: engine_generate(engine, prompts, args.samples), 1, args.clock
            )
            t_hf, n_hf = timed(
                lambda: hf_generate(hf_model, prompts, args.samples, args.hf_chunks), 1, args.clock
            )
            pairs.append((n_eng / t_eng, n_hf / t_hf))
            times.append((t_eng, t_hf))
            if hf_fp32 is not None:
                t32, n32 = timed(
                    lambda: hf_generate(hf_fp32, prompts, args.samples, args.hf_chunks),
                    1,
                    args.clock,
                )
                fp32_rates.append(n32 / t32)
        best_eng, best_hf = max(p[0] for p in pairs), max(p[1] for p in pairs)
        print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
        print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(
            f"model {args.preset} ({args.dtype}), torch threads {torch.get_num_threads()}, "
            f"{args.repeats} paired runs, {args.clock} clock"
        )
        batch = args.prompts * args.samples
        print(
            f"workload: {args.prompts} prompts x {args.samples} samples (batch {batch}), "
            f"{NEW_TOKENS} new tokens, T=1"
        )
        print(f"  embedded engine : {best_eng:9.1f} tok/s (best; {n_eng} tokens per run)")
        print(f"  transformers    : {best_hf:9.1f} tok/s (best; {n_hf} tokens per run)")
        print(f"  ratio of bests  : {best_eng / best_hf:9.2f}x")
        ratios = sorted(e / h for e, h in pairs)
        print(f"  per-pair ratios : {', '.join(f'{r:.2f}x' for r in ratios)}")
        if fp32_rates:
            best32 = max(fp32_rates)
            vs32 = sorted(p[0] / r for p, r in zip(pairs, fp32_rates, strict=True))
            print(
                f"  transformers fp32: {best32:9.1f} tok/s (best; same rounds)\n"
                f"  engine {args.dtype} / transformers {args.dtype}: {best_eng / best_hf:.2f}x; "
                f"engine {args.dtype} / transformers fp32: {best_eng / best32:.2f}x "
                f"(per round {', '.join(f'{r:.2f}x' for r in vs32)})"
            )
        print_floor(model.config, prompts, args, min(t[0] for t in times), min(t[1] for t in times))
        print("embedded engine, absolute (n=1 requests, 32 new tokens, T=1):")
        for batch in (1, 16, 64, 512):
            batch_prompts = make_prompts(batch, model.config.vocab_size, seed=batch)
            t, n = timed(
                lambda bp=batch_prompts: engine_generate(engine, bp, 1), args.repeats, args.clock
            )
            print(f"  batch {batch:4d}: {n / t:9.1f} tok/s ({n} tokens, {t:.2f} s)")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
