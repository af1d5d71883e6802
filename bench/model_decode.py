"""Decode throughput of the toy GLM-4 MoE with Physarum's KV cache vs transformers' generate.

Same weights, same prompts, greedy, fixed number of new tokens; both sides timed end to end
(prefill + decode) in this process, interleaved per batch size, best of `--repeats`. Also
reports our decode-only rate, the greedy-token agreement with HF, and the FP8 model's rate
with each FP8 kernel.

    .venv/bin/python bench/model_decode.py [--batches 1 16 64 512] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from models import Glm4MoeForCausalLM, get_preset, quantize_model_


def ours_generate(model: Glm4MoeForCausalLM, prompts: torch.Tensor, new: int) -> tuple:
    """Greedy: one prefill forward, then one forward per new token. -> (tokens, s, decode s)."""
    b, p = prompts.shape
    cache = model.new_kv_cache(b, p + new)
    slots = torch.arange(b)
    t0 = time.perf_counter()
    logits = model.forward_cached(
        prompts, slots, torch.zeros(b, dtype=torch.long), torch.full((b,), p), cache
    )
    out = [logits.argmax(-1)]
    t1 = time.perf_counter()
    ones = torch.ones(b, dtype=torch.long)
    for i in range(new - 1):
        logits = model.forward_cached(out[-1][:, None], slots, torch.full((b,), p + i), ones, cache)
        out.append(logits.argmax(-1))
    t2 = time.perf_counter()
    return torch.stack(out, 1), t2 - t0, t2 - t1


def hf_generate(model: torch.nn.Module, prompts: torch.Tensor, new: int) -> tuple:
    t0 = time.perf_counter()
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
    return out[:, prompts.shape[1] :], time.perf_counter() - t0


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours, hf = build(args.vocab, 0)
    fp8 = {}
    if not args.no_fp8:
        for kernel in ("dequant", "scaled_mm"):
            m, _ = build(args.vocab, 0)
            fp8[kernel] = quantize_model_(m, (128, 128), kernel)
    print(f"toy GLM-4 MoE, vocab {args.vocab}, prompt {args.prompt_len}, {args.new_tokens} new")
    print(f"torch threads {args.threads}, best of {args.repeats}; tok/s = batch*new/seconds")
    head = f"{'batch':>6} {'ours tok/s':>11} {'decode-only':>12} {'HF tok/s':>10} {'speedup':>8}"
    print(head + f" {'agree':>6}" + "".join(f" {'fp8 ' + k:>14}" for k in fp8))
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
        line += "".join(f" {n / min(v):>14.0f}" for v in fp8_s.values())
        print(line, flush=True)


if __name__ == "__main__":
    main()
