"""Embedded engine vs SGLang 0.5.23 on this CPU: decode tokens/s on the same model and prompts,
and the cost of each weight-sync path for the toy model.

    .venv/bin/python bench/engine_vs_sglang.py [--preset glm4moe-toy] [--batches 1 16 64]
        [--new-tokens 64] [--dtype float32] [--out results.json]

Both engines get the same checkpoint (our `models.checkpoint.save_pretrained` output, HF
names, plus the toy tokenizer) and the same greedy requests (ignore_eos, fixed lengths); they
alternate on each batch size and the best of `--reps` runs counts, so load from other
processes hits both alike. SGLang runs as a real server (CPU flags, transformers backend) in
its own environment; its time includes HTTP (one request per prompt, sent concurrently).
Weight-sync costs are end to end (serialise/write + server load + session + version check),
median of `--sync-reps` pushes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
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


async def decode_rates(engines: dict, args, vocab: int) -> dict[int, dict[str, tuple]]:
    """Best-of-reps tokens/s per batch size; the engines alternate on identical requests so
    that load from other processes on the machine hits both alike."""
    for engine in engines.values():
        await engine.generate(requests(2, args.prompt_len, 4, vocab))  # warm-up
    rates: dict[int, dict[str, tuple]] = {}
    for b in args.batches:
        reqs = requests(b, args.prompt_len, args.new_tokens, vocab)
        best: dict[str, tuple] = {}
        for _ in range(args.reps):
            for label, engine in engines.items():
                rate, outs = await timed_generate(engine, reqs)
                print(f"  batch {b:>3} {label:<8} {rate:9.1f} tok/s", flush=True)
                if label not in best or rate > best[label][0]:
                    best[label] = (rate, outs)
        rates[b] = best
    return rates


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


def start_sglang(args, ckpt: Path, work: Path) -> tuple[SGLangServer, str]:
    env = probe(args.sglang_python)
    server_args = ServerArgs(
        model_path=str(ckpt),
        port=free_port(),
        dtype=args.dtype,
        max_total_tokens=max(4096, max(args.batches) * (args.prompt_len + args.new_tokens) * 2),
        random_seed=0,
    )
    server = SGLangServer(server_args, python=env.python, log_path=work / "sglang.log")
    server.launch()
    return server, env.describe()


def run_both(args, server: SGLangServer, model, vocab: int, work: Path) -> dict:
    async def body():
        worker = Worker.for_server(server, timeout=600)
        embedded = EmbeddedEngine(
            model, max_running=max(args.batches), context_len=args.prompt_len + args.new_tokens
        )
        try:
            engines = {"embedded": embedded, "sglang": worker.client}
            rates = await decode_rates(engines, args, vocab)
            costs = await sync_costs(worker, model, args.sync_reps, work / "weights")
            emb_cost = await embedded_sync_cost(embedded, model, args.sync_reps)
        finally:
            await worker.client.close()
            embedded.shutdown()
        return {"rates": rates, "sync": costs, "embedded_sync": emb_cost}

    return asyncio.run(body())


def report(args, res: dict) -> dict:
    print(f"\ndate {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"torch threads (embedded engine) {torch.get_num_threads()}")
    print(f"SGLang: {res['env']}; server start-up {res['startup_s']:.1f} s")
    print(f"decode, greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.dtype}")
    head = ("batch", "embedded tok/s", "sglang tok/s", "ratio", "same tokens")
    print(f"{head[0]:>6} {head[1]:>15} {head[2]:>13} {head[3]:>7} {head[4]:>12}")
    rows = []
    for b in args.batches:
        (er, eo), (sr, so) = res["rates"][b]["embedded"], res["rates"][b]["sglang"]
        same = sum(x == y for e, s in zip(eo, so) for x, y in zip(e.output_ids, s.output_ids))
        total = sum(len(e.output_ids) for e in eo)
        print(f"{b:>6} {er:>15.1f} {sr:>13.1f} {er / sr:>7.2f} {same / total:>12.1%}")
        rows.append({"batch": b, "embedded": er, "sglang": sr, "token_agreement": same / total})
    print(f"\nweight sync of the whole {args.preset} (bf16), median of {args.sync_reps}:")
    print(f"  embedded engine (in-process load): {res['embedded_sync'] * 1e3:8.1f} ms")
    for label, secs in res["sync"].items():
        print(f"  sglang {label:<18}: {secs * 1e3:8.1f} ms")
    return {"decode": rows, "sync_s": res["sync"], "embedded_sync_s": res["embedded_sync"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="glm4moe-toy")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3, help="decode runs per engine and batch")
    parser.add_argument("--sync-reps", type=int, default=7, help="pushes per weight-sync path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sglang-python", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoint and logs here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"start {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}", end=", ")
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench_sglang_") as tmp:
        work = args.work or Path(tmp)
        model = build_checkpoint(work / "ckpt", args.preset, dtype)
        server, env = start_sglang(args, work / "ckpt", work)
        try:
            res = run_both(args, server, model, model.config.vocab_size, work)
        finally:
            server.stop()
        res.update(env=env, startup_s=server.startup_seconds)
        result = report(args, res)
    result.update(preset=args.preset, dtype=args.dtype, startup_s=server.startup_seconds)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
