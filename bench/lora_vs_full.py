"""LoRA against full fine-tuning in the torch backend, side by side, same model, same data.

For each model (the toy, and a >= 30M-parameter GLM-4 MoE, `--big`), each side runs in its own
fresh process (peak RSS is per process): build the backend with a KL reference
(algorithm.kl.coef > 0: full FT keeps a frozen copy, LoRA disables its adapters), GRPO steps on
the toy arithmetic groups (tests/trainer/toy), then the weight sync of the result to a
receiving model (the embedded engine's `apply_weight_update`: full weights loaded, or
adapters merged onto the kept base).

Reported per side: parameters trained, trainer peak RSS (MiB) and the bytes the trainer holds in
weights + grads + AdamW state + the reference, median step time, weight-sync bytes on the wire
(`encode_weight_update`) and seconds (build + encode + decode + apply), the KL reference's
memory; for LoRA also the embedded engine's choice (merge at each update vs an unmerged
adapter forward) and the FP8 rollout mismatch (|Δ logprob| engine vs trainer).

    .venv/bin/python bench/lora_vs_full.py [--steps 5] [--threads 2] [--models toy] [--sides lora]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
from configs import AlgorithmConfig, TrainerConfig  # noqa: E402
from models import Glm4MoeForCausalLM, get_preset  # noqa: E402
from models.fp8 import quantize_model_  # noqa: E402
from models.lora_merge import keep_exact_base  # noqa: E402
from models.weight_update import (  # noqa: E402
    apply_weight_update,
    decode_weight_update,
    encode_weight_update,
)
from tests.trainer.toy import grpo_step, make_tokenizer, set_rollout_logprobs  # noqa: E402
from trainer.lora_backend import merged_state  # noqa: E402
from trainer.torch_backend import TorchBackend  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "toy": {},
    "small-36M": dict(
        hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        n_routed_experts=16,
    ),
}  # fmt: skip
LORA = {
    "rank": 8,
    "alpha": 16.0,
    "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "shared_experts", "experts",
    ],
}  # fmt: skip


def _model(name: str, vocab: int) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=vocab, **MODELS[name]))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held_bytes(tb: TorchBackend) -> dict[str, int]:
    weights = _nbytes(tb.model.state_dict().values())
    trained = [p for g in tb.optimizer.param_groups for p in g["params"]]
    adapters = _nbytes(tb.lora.parameters()) if tb.lora is not None else 0
    state = _nbytes(t for s in tb.optimizer.state.values() for t in s.values() if t.dim())
    ref = _nbytes(tb.ref.state_dict().values()) if tb.ref is not None else 0
    return {
        "weights": weights + adapters,
        "grads": _nbytes(p for p in trained if p.grad is not None),
        "adam_state": state,
        "reference": ref,
    }


def _sync(tb: TorchBackend, receiver: Glm4MoeForCausalLM) -> tuple[int, float]:
    t0 = time.perf_counter()
    wire = encode_weight_update(tb.weight_update())
    apply_weight_update(receiver, decode_weight_update(bytearray(wire)))
    return len(wire), time.perf_counter() - t0


def _mismatch(tb: TorchBackend, receiver: Glm4MoeForCausalLM, tok: Any) -> float:
    """Mean |Δ logprob| over response tokens, receiver vs the trainer's actor."""
    step = grpo_step(tok, n_prompts=4, n_samples=4, seed=99)
    diffs = []
    with torch.no_grad():
        for b, ours in zip(step.micro_batches, tb.logprobs(step.micro_batches), strict=True):
            theirs = receiver.token_logprobs(b.input_ids, b.cu_seqlens).logprobs
            diffs.append(((ours - theirs).abs() * b.loss_mask).sum() / b.loss_mask.sum())
    return float(torch.stack(diffs).mean())


def _engine_choice(tb: TorchBackend, tok: Any, repeats: int = 5) -> dict[str, float]:
    """Merged (W + s B A written at each update, plain forward) vs unmerged (adapter hooks in
    every forward): the merge's cost per update and each forward's time on a rollout-sized
    pack."""
    merged = _model(tb._bench_name, len(tok))
    step = grpo_step(tok, n_prompts=8, n_samples=8, seed=7)
    b = step.micro_batches[0]
    t_merge = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_weight_update(merged, tb.weight_update())
        t_merge.append(time.perf_counter() - t0)

    def forward_s(model: Any) -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.forward_packed(b.input_ids, b.cu_seqlens)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {
        "merge_per_update_s": statistics.median(t_merge),
        "forward_merged_s": forward_s(merged),
        "forward_unmerged_s": forward_s(tb.model),
        "pack_tokens": float(b.num_tokens),
    }


def run_side(name: str, lora: bool, steps: int, threads: int, tok_dir: str, out: Any) -> None:
    torch.set_num_threads(threads)
    tok = make_tokenizer(tok_dir)
    model = _model(name, len(tok))
    cfg = TrainerConfig(lr=1e-3, lora=LORA if lora else None)
    algo = AlgorithmConfig(advantage="grpo", kl={"coef": 0.01})
    tb = TorchBackend(model, cfg, algo)
    tb._bench_name = name
    times = []
    for i in range(steps + 1):
        step = grpo_step(tok, n_prompts=8, n_samples=8, seed=i)
        set_rollout_logprobs(tb, step)
        t0 = time.perf_counter()
        tb.train(step)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    held = _held_bytes(tb)
    receiver = _model(name, len(tok))
    syncs = [_sync(tb, receiver) for _ in range(3)]
    result: dict[str, Any] = {
        "model": name,
        "side": "lora" if lora else "full",
        "params": sum(p.numel() for p in model.parameters()),
        "trained_params": sum(p.numel() for g in tb.optimizer.param_groups for p in g["params"]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "held_mib": {k: v / 2**20 for k, v in held.items()},
        "step_s": statistics.median(times),
        "sync_bytes": syncs[-1][0],
        "sync_s": statistics.median(s for _, s in syncs),
        "receiver_mismatch": _mismatch(tb, receiver, tok),
    }
    fp8 = _model(name, len(tok))
    if lora:  # as the rollout worker does: the exact base kept before quantizing
        keep_exact_base(fp8, cfg.lora)
    quantize_model_(fp8)
    apply_weight_update(fp8, tb.weight_update())
    result["fp8_mismatch"] = _mismatch(tb, fp8, tok)
    if lora:  # one quantization of the exact merged weights (equal by test), the base alone
        once = quantize_model_(_model(name, len(tok)))
        once.load_hf_state_dict(merged_state(tb.model, tb.lora))  # quantized once, exact W+sBA
        result["fp8_mismatch_one_quant"] = _mismatch(tb, once, tok)
        with tb.lora.disabled():
            result["fp8_mismatch_base"] = _mismatch(
                tb, quantize_model_(_model(name, len(tok))), tok
            )
        result["engine"] = _engine_choice(tb, tok)
    out.put(result)


def interleaved_step_times(name: str, steps: int, threads: int, tok_dir: str) -> dict[str, float]:
    """Median GRPO step time of both sides in one process, steps alternating (same load)."""
    torch.set_num_threads(threads)
    tok = make_tokenizer(tok_dir)
    algo = AlgorithmConfig(advantage="grpo", kl={"coef": 0.01})
    sides = {
        side: TorchBackend(_model(name, len(tok)), TrainerConfig(lr=1e-3, lora=cfg), algo)
        for side, cfg in (("full", None), ("lora", LORA))
    }
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(steps + 1):
        for side, tb in sides.items():
            step = grpo_step(tok, n_prompts=8, n_samples=8, seed=i)
            set_rollout_logprobs(tb, step)
            t0 = time.perf_counter()
            tb.train(step)
            if i:
                times[side].append(time.perf_counter() - t0)
    return {side: statistics.median(t) for side, t in times.items()}


def _row(r: dict[str, Any]) -> str:
    held = r["held_mib"]
    return (
        f"| {r['model']} | {r['side']} | {r['params'] / 1e6:.1f}M | "
        f"{r['trained_params'] / 1e6:.3f}M | {r['peak_rss_mib']:.0f} | "
        f"{sum(held.values()):.1f} | {held['reference']:.1f} | {r['step_s']:.3f} | "
        f"{r['sync_bytes'] / 2**20:.3f} | {r['sync_s']:.4f} | {r['fp8_mismatch']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sides", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--interleaved", action="store_true", help="only step times, both sides alternating"
    )
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(tmp)
        if args.interleaved:
            for name in args.models:
                medians = interleaved_step_times(name, args.steps, args.threads, tmp)
                print(f"{name} interleaved step s: " + json.dumps(medians), flush=True)
            return
        for name in args.models:
            for lora in (side == "lora" for side in args.sides):
                queue = ctx.Queue()
                proc = ctx.Process(
                    target=run_side, args=(name, lora, args.steps, args.threads, tmp, queue)
                )
                proc.start()
                results.append(queue.get())
                proc.join()
                print(json.dumps(results[-1]), flush=True)
    print(
        "\n| model | side | params | trained | peak RSS MiB | held MiB | of which ref MiB "
        "| step s | sync MiB | sync s | FP8 |Δlogp| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(_row(r))
    for r in results:
        if "engine" in r:
            print(
                f"{r['model']} FP8 |Δlogp| with LoRA: the engine (exact base kept) "
                f"{r['fp8_mismatch']:.4f}, one quantization of the exact merged weights "
                f"{r['fp8_mismatch_one_quant']:.4f}, the base alone {r['fp8_mismatch_base']:.4f}"
            )
            e = r["engine"]
            print(
                f"{r['model']} engine: merge {e['merge_per_update_s'] * 1e3:.1f} ms/update; "
                f"forward of a {e['pack_tokens']:.0f}-token pack merged "
                f"{e['forward_merged_s'] * 1e3:.1f} ms vs unmerged "
                f"{e['forward_unmerged_s'] * 1e3:.1f} ms"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
