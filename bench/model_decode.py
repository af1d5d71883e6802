"""Decode throughput of the toy GLM-4 MoE with Physarum's KV cache vs transformers' generate.

Same weights, same prompts, greedy, fixed number of new tokens; both sides timed end to end
(prefill + decode) in this process, interleaved per batch size, best of `--repeats`. Also
reports our decode-only rate, the greedy-token agreement with HF and the rate of the FP8
(128x128 block) model, whose decode path runs on weights dequantized once per weight version.
Then times one FP8 linear layer per kernel (per-block dequant vs torch._scaled_mm) against
the fp32 linear at decode shapes.

    .venv/bin/python bench/model_decode.py [--batches 1 16 64 512] [--new-tokens 32]
        [--threads 2] [--clock wall|cpu]

`--clock cpu` times with the process CPU clock: on a machine shared with other jobs it
measures the work done rather than the share of the CPU obtained (use it with --threads 1).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import transformers

from models import Fp8Linear, Glm4MoeForCausalLM, get_preset, quantize_model_

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def ours_generate(model: Glm4MoeForCausalLM, prompts: torch.Tensor, new: int) -> tuple:
    """Greedy: one prefill forward, then one forward per new token. -> (tokens, s, decode s)."""
    b, p = prompts.shape
    cache = model.new_kv_cache(b, p + new)
    slots = torch.arange(b)
    t0 = clock()
    logits = model.forward_cached(
        prompts, slots, torch.zeros(b, dtype=torch.long), torch.full((b,), p), cache
    )
    out = [logits.argmax(-1)]
    t1 = clock()
    ones = torch.ones(b, dtype=torch.long)
    for i in range(new - 1):
        logits = model.forward_cached(out[-1][:, None], slots, torch.full((b,), p + i), ones, cache)
        out.append(logits.argmax(-1))
    t2 = clock()
    return torch.stack(out, 1), t2 - t0, t2 - t1


def hf_generate(model: torch.nn.Module, prompts: torch.Tensor, new: int) -> tuple:
    t0 = clock()
    with torch.inference_mode():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, prompts.shape[1] :], clock() - t0


def build(vocab: int, seed: int) -> tuple[Glm4MoeForCausalLM, torch.nn.Module]:
    torch.manual_seed(seed)
    ours = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=vocab)).eval()
    hf_config = transformers.Glm4MoeConfig.from_dict(ours.config.to_hf_dict())
    hf = transformers.Glm4MoeForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    hf.generation_config.pad_token_id = 0
    return ours, hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 512])
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    ours, hf = build(args.vocab, 0)
    fp8 = {}
    if not args.no_fp8:
        m, _ = build(args.vocab, 0)
        fp8["fp8"] = quantize_model_(m, (128, 128))
    print(f"toy GLM-4 MoE, vocab {args.vocab}, prompt {args.prompt_len}, {args.new_tokens} new")
    print(
        f"torch threads {args.threads}, {args.clock} clock, best of {args.repeats}; "
        "tok/s = batch*new/seconds"
    )
    head = f"{'batch':>6} {'ours tok/s':>11} {'decode-only':>12} {'HF tok/s':>10} {'speedup':>8}"
    print(head + f" {'agree':>6}" + "".join(f" {k + ' tok/s':>11}" for k in fp8))
    for b in args.batches:
        prompts = torch.randint(1, args.vocab, (b, args.prompt_len))
        n = b * args.new_tokens
        ours_s, dec_s, hf_s = [], [], []
        fp8_s = {k: [] for k in fp8}
        for _ in range(args.repeats):
            toks, s, d = ours_generate(ours, prompts, args.new_tokens)
            ours_s.append(s)
            dec_s.append(d)
            ref, h = hf_generate(hf, prompts, args.new_tokens)
            hf_s.append(h)
            for k, m in fp8.items():
                fp8_s[k].append(ours_generate(m, prompts, args.new_tokens)[1])
        agree = (toks == ref).float().mean().item()
        dec_rate = b * (args.new_tokens - 1) / min(dec_s)
        line = f"{b:>6} {n / min(ours_s):>11.0f} {dec_rate:>12.0f} {n / min(hf_s):>10.0f}"
        line += f" {min(hf_s) / min(ours_s):>7.1f}x {agree:>6.3f}"
        line += "".join(f" {n / min(v):>11.0f}" for v in fp8_s.values())
        print(line, flush=True)
    if not args.no_fp8:
        fp8_kernels(args.repeats)


def fp8_kernels(repeats: int) -> None:
    """Microseconds per call of a 128 -> 512 linear (the toy's dense up-projection)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 512, bias=False)
    layers = {"fp32": linear}
    for kernel in ("dequant", "scaled_mm"):
        layers["fp8 " + kernel] = Fp8Linear.from_linear(linear, (128, 128), kernel)
    print("\nFP8 linear 128->512, us per call:")
    print(f"{'rows':>6}" + "".join(f" {k:>14}" for k in layers))
    for rows in (1, 64, 512):
        x = torch.randn(rows, 128)
        line = f"{rows:>6}"
        for layer in layers.values():
            best = float("inf")
            with torch.inference_mode():
                for _ in range(repeats):
                    t = clock()
                    for _ in range(50):
                        layer(x)
                    best = min(best, (clock() - t) / 50)
            line += f" {best * 1e6:>14.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
