"""Embedded engine vs SGLang 0.5.23 on this CPU: decode tokens/s on the same model and prompts,
and the cost of each weight-sync path for the toy model.

    .venv/bin/python bench/engine_vs_sglang.py [--preset glm4moe-toy] [--batches 1 16 64]
        [--new-tokens 64] [--dtype float32] [--out results.json]

Both engines get the same checkpoint (our `models.checkpoint.save_pretrained` output, HF
names, plus the toy tokenizer), the same greedy requests (ignore_eos, fixed lengths), and run
one after the other in this script. SGLang runs as a real server (CPU flags, transformers
backend) in its own environment; its time includes HTTP. Weight-sync costs are end to end
(serialise/write + server load + session + version check), median of `--reps` pushes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.checkpoint import save_pretrained
from models.config import get_preset
from models.glm4moe import Glm4MoeForCausalLM
from models.tokenizer import build_toy_tokenizer
from models.weight_update import build_weight_update
from rollout.embedded.engine import EmbeddedEngine
from rollout.sglang.environment import probe
from rollout.sglang.server import ServerArgs, SGLangServer, free_port
from rollout.sglang.weight_sync import make_weight_sync, push_update
from rollout.sglang.worker import Worker
from rollout.types import GenerateRequest, SamplingParams

CORPUS = ["12 + 35 = 47", "the quick brown fox jumps over the lazy dog", "countdown 3 4 6 8"] * 30
SYNC_PATHS = [
    ("tensor", {"flattened": True}),
    ("tensor", {"flattened": False}),
    ("distributed", {"flattened": True}),
    ("distributed", {"flattened": False}),
    ("disk", {}),
]


def build_checkpoint(out: Path, preset: str, dtype: torch.dtype) -> Glm4MoeForCausalLM:
    tokenizer = build_toy_tokenizer(out, CORPUS, vocab_size=512)
    model = Glm4MoeForCausalLM(get_preset(preset, vocab_size=len(tokenizer), initializer_range=0.1))
    model.init_weights(torch.Generator().manual_seed(0))
    model.to_dtype(dtype)
    save_pretrained(model, out)
    return model.eval()


def requests(batch: int, prompt_len: int, new_tokens: int, vocab: int) -> list[GenerateRequest]:
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [
        GenerateRequest(torch.randint(300, vocab, (prompt_len,), generator=gen).tolist(), params)
        for _ in range(batch)
    ]


async def timed_generate(engine, reqs) -> tuple[float, list]:
    began = time.perf_counter()
    outs = await engine.generate(reqs)
    elapsed = time.perf_counter() - began
    return sum(len(o.output_ids) for o in outs) / elapsed, outs


async def decode_rates(engine, args, vocab: int) -> dict[int, tuple[float, list]]:
    await engine.generate(requests(2, args.prompt_len, 4, vocab))  # warm-up
    return {
        b: await timed_generate(engine, requests(b, args.prompt_len, args.new_tokens, vocab))
        for b in args.batches
    }


async def sync_costs(worker: Worker, model, reps: int, staging: Path) -> dict[str, float]:
    update = build_weight_update(model.hf_state_dict(), 1)
    costs = {}
    for name, options in SYNC_PATHS:
        if name == "disk":
            options = {"staging_dir": staging}
        sync = make_weight_sync(name, **options)
        times = []
        for rep in range(reps):
            update.version = rep + 2
            times.append(await push_update(sync, [worker], update))
        await sync.close([worker])
        label = f"{name}{'-flat' if options.get('flattened') else ''}"
        costs[label] = statistics.median(times)
    return costs


async def embedded_sync_cost(engine: EmbeddedEngine, model, reps: int) -> float:
    update = build_weight_update(model.hf_state_dict(), 1)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        await engine.update_weights(update)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_sglang(args, ckpt: Path, model, vocab: int, work: Path) -> dict:
    env = probe(args.sglang_python)
    server_args = ServerArgs(
        model_path=str(ckpt),
        port=free_port(),
        dtype=args.dtype,
        max_total_tokens=max(4096, max(args.batches) * (args.prompt_len + args.new_tokens) * 2),
        random_seed=0,
    )
    server = SGLangServer(server_args, python=env.python, log_path=work / "sglang.log")
    startup = server.launch()

    async def body():
        worker = Worker.for_server(server, timeout=600)
        try:
            rates = await decode_rates(worker.client, args, vocab)
            costs = await sync_costs(worker, model, args.reps, work / "weights")
        finally:
            await worker.client.close()
        return rates, costs

    try:
        rates, costs = asyncio.run(body())
    finally:
        server.stop()
    return {"startup_s": startup, "rates": rates, "sync": costs, "env": env.describe()}


def run_embedded(args, model, vocab: int) -> dict:
    async def body():
        engine = EmbeddedEngine(
            model, max_running=max(args.batches), context_len=args.prompt_len + args.new_tokens
        )
        try:
            rates = await decode_rates(engine, args, vocab)
            cost = await embedded_sync_cost(engine, model, args.reps)
        finally:
            engine.shutdown()
        return rates, cost

    rates, cost = asyncio.run(body())
    return {"rates": rates, "sync": cost}


def report(args, emb: dict, sgl: dict) -> dict:
    print(f"\nSGLang: {sgl['env']}; server start-up {sgl['startup_s']:.1f} s")
    print(f"decode, greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.dtype}")
    print(
        f"{'batch':>6} {'embedded tok/s':>15} {'sglang tok/s':>13} {'ratio':>7} {'same tokens':>12}"
    )
    rows = []
    for b in args.batches:
        (er, eo), (sr, so) = emb["rates"][b], sgl["rates"][b]
        same = sum(x == y for e, s in zip(eo, so) for x, y in zip(e.output_ids, s.output_ids))
        total = sum(len(e.output_ids) for e in eo)
        print(f"{b:>6} {er:>15.1f} {sr:>13.1f} {er / sr:>7.2f} {same / total:>12.1%}")
        rows.append({"batch": b, "embedded": er, "sglang": sr, "token_agreement": same / total})
    print(f"\nweight sync of the whole {args.preset} (bf16), median of {args.reps}:")
    print(f"  embedded engine (in-process load): {emb['sync'] * 1e3:8.1f} ms")
    for label, secs in sgl["sync"].items():
        print(f"  sglang {label:<18}: {secs * 1e3:8.1f} ms")
    return {"decode": rows, "sync_s": sgl["sync"], "embedded_sync_s": emb["sync"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="glm4moe-toy")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sglang-python", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench_sglang_") as tmp:
        work = Path(tmp)
        model = build_checkpoint(work / "ckpt", args.preset, dtype)
        vocab = model.config.vocab_size
        emb = run_embedded(args, model, vocab)
        sgl = run_sglang(args, work / "ckpt", model, vocab, work)
        result = report(args, emb, sgl)
    result.update(preset=args.preset, dtype=args.dtype, startup_s=sgl["startup_s"])
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
