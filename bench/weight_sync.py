"""Weight sync, trainer -> engine, per phase, against this machine's memcpy bandwidth.

On a >= 30M-parameter GLM-4 MoE (bench/lora_vs_full.py's `small-36M` shape), in bf16 and in
blockwise FP8, two real paths:

  embedded  a trainer actor builds the update (cast / quantize + pack: `export`) and puts it in
            Ray's object store (`put`); a rollout actor holding an EmbeddedEngine gets it
            (`get`: deserialization from the store) and loads it between decode steps
            (`load`: apply_weight_update). This is what `weight_update_ref` + the rollout
            group's `update_weights.remote(ref)` do in a job. Peer for the transfer, in the
            same reps: the same payloads put and got as plain torch tensors
            (`torch_pickle_put` / `_get`, not in `total`), as they travelled before.
  sglang    the update built here (`export`), then SGLang's tensor path (TensorSync,
            flattened bucket): `serialize` (shared-memory bucket + pickle), `request` (the
            POST: SGLang unpickles and loads the weights), `session` (begin/end weight update
            + the version check). `total` is `push_update` timed on its own, alternated with
            the phased run.

memcpy: `dst.copy_(src)` of a uint8 tensor as large as the update, in the same run with the
same torch thread count. GB/s everywhere = update bytes / seconds (10^9 bytes).

    .venv/bin/python bench/weight_sync.py [--reps 5] [--paths embedded sglang]
        [--dtypes bf16 fp8] [--threads 1] [--sglang-fp8-server] [--out result.json]
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from models.checkpoint import save_pretrained  # noqa: E402
from models.config import get_preset  # noqa: E402
from models.glm4moe import Glm4MoeForCausalLM  # noqa: E402
from models.tokenizer import build_toy_tokenizer  # noqa: E402
from models.weight_update import WeightUpdate, build_weight_update  # noqa: E402

# bench/lora_vs_full.py's "small-36M" (kept in step by hand: importing that script pulls in
# the trainer and the toy task)
SMALL_36M: dict[str, Any] = dict(
    hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    n_routed_experts=16,
)  # fmt: skip
VOCAB = 512
NO_CPU_FP8 = (
    "not started: SGLang 0.5.23's CPU build has no FP8 kernels (`--quantization fp8` dies at "
    "load: NameError sgl_per_tensor_quant_fp8); --sglang-fp8-server tries anyway"
)
BLOCK = (128, 128)
CORPUS = ["12 + 35 = 47", "the quick brown fox jumps over the lazy dog", "countdown 3 4 6 8"] * 30


def make_model(seed: int) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", vocab_size=VOCAB, **SMALL_36M))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def build(model: Glm4MoeForCausalLM, version: int, fp8: bool) -> WeightUpdate:
    """The trainer's export: bf16 (the model's own dtype here) or blockwise FP8."""
    return build_weight_update(
        model.hf_state_dict(), version, dtype=torch.bfloat16, fp8_block=BLOCK if fp8 else None
    )


def memcpy_s(nbytes: int, reps: int) -> float:
    """Median seconds of one `copy_` of nbytes (fresh pages touched before timing)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# --- embedded engine through Ray's object store ----------------------------------------------
def embedded_runs(args: argparse.Namespace, fp8: bool) -> tuple[dict[str, float], int]:
    import ray

    from rollout.embedded.engine import EmbeddedEngine

    env = {"env_vars": {"OMP_NUM_THREADS": str(args.threads)}}

    @ray.remote(num_cpus=1, runtime_env=env)
    class TrainerSide:
        def __init__(self) -> None:
            torch.set_num_threads(args.threads)
            self.model = make_model(seed=0).to_dtype(torch.bfloat16)

        def export(self, version: int) -> tuple[list[Any], dict[str, float], int]:
            began = time.perf_counter()
            update = build(self.model, version, fp8)
            built = time.perf_counter()
            ref = ray.put(update)
            phases = {"export": built - began, "put": time.perf_counter() - built}
            return [ref], phases, update.nbytes

        def export_torch_pickled(self, version: int) -> tuple[list[Any], float]:
            """The same payloads as plain torch tensors: how they travelled before buckets
            pickled as numpy (torch's reduction, through torch.save)."""
            payloads = [b.payload for b in build(self.model, version, fp8).buckets]
            began = time.perf_counter()
            ref = ray.put(payloads)
            return [ref], time.perf_counter() - began

        def checksum(self) -> float:
            return float(sum(t.float().sum() for _, t in self.model.hf_state_dict()))

    @ray.remote(num_cpus=1, runtime_env=env)
    class RolloutSide:
        def __init__(self) -> None:
            torch.set_num_threads(args.threads)
            model = make_model(seed=1).to_dtype(torch.bfloat16)
            self.engine = EmbeddedEngine(model, max_running=2, context_len=64, fp8=fp8)

        async def receive(self, refs: list[Any]) -> dict[str, float]:
            began = time.perf_counter()
            update = await refs[0]
            got = time.perf_counter()
            await self.engine.update_weights(update)
            return {"get": got - began, "load": time.perf_counter() - got}

        async def get_only(self, refs: list[Any]) -> float:
            began = time.perf_counter()
            await refs[0]
            return time.perf_counter() - began

        def checksum(self) -> float:
            return float(sum(t.float().sum() for _, t in self.engine.model.hf_state_dict()))

    trainer, rollout = TrainerSide.remote(), RolloutSide.remote()
    runs, nbytes = [], 0
    for rep in range(args.reps + 1):  # the first is a warm-up
        began = time.perf_counter()
        refs, phases, nbytes = ray.get(trainer.export.remote(rep + 1))
        phases.update(ray.get(rollout.receive.remote(refs)))
        phases["total"] = time.perf_counter() - began
        del refs
        refs, phases["torch_pickle_put"] = ray.get(trainer.export_torch_pickled.remote(rep + 1))
        phases["torch_pickle_get"] = ray.get(rollout.get_only.remote(refs))
        del refs
        if rep:
            runs.append(phases)
    if not fp8:  # bf16 in, bf16 out: the engine holds exactly the trainer's weights
        sent, held = ray.get([trainer.checksum.remote(), rollout.checksum.remote()])
        if sent != held:
            raise RuntimeError(f"embedded bf16 sync: checksum {held} != trainer's {sent}")
    for actor in (trainer, rollout):
        ray.kill(actor)
    return median_phases(runs), nbytes


# --- SGLang tensor path ------------------------------------------------------------------------
def start_sglang(args: argparse.Namespace, work: Path, quantization: str | None) -> Any:
    from rollout.sglang.environment import probe
    from rollout.sglang.server import ServerArgs, SGLangServer, free_port

    env = probe(args.sglang_python)
    server_args = ServerArgs(
        model_path=str(work / "ckpt"),
        port=free_port(),
        dtype="bfloat16",
        max_total_tokens=1024,
        random_seed=0,
        quantization=quantization,
        extra_args=["--skip-tokenizer-init"],
    )
    server = SGLangServer(server_args, python=env.python, log_path=work / "sglang.log")
    server.launch()
    return server


async def sglang_phased(worker: Any, update: WeightUpdate) -> dict[str, float]:
    """TensorSync.push + push_update's session and version check, each part timed."""
    from rollout.sglang.weight_sync import TensorSync

    sync, client = TensorSync(flattened=True), worker.client
    phases = {"serialize": 0.0, "request": 0.0}
    began = time.perf_counter()
    await client.begin_weight_update()
    session = time.perf_counter() - began
    for i, bucket in enumerate(update.buckets):
        t0 = time.perf_counter()
        payload = sync._payload(bucket)
        t1 = time.perf_counter()
        last = i == len(update.buckets) - 1
        result = await client.update_weights_from_tensor(
            [payload],
            load_format="flattened_bucket",
            flush_cache=False,
            weight_version=str(update.version) if last else None,
        )
        t2 = time.perf_counter()
        if isinstance(result, dict) and result.get("success") is False:
            raise RuntimeError(f"sglang tensor sync: {result.get('message')}")
        phases["serialize"] += t1 - t0
        phases["request"] += t2 - t1
    t3 = time.perf_counter()
    await client.end_weight_update()
    got = await client.weight_version()
    if got != str(update.version):
        raise RuntimeError(f"sglang reports version {got!r}, pushed {update.version}")
    phases["session"] = session + time.perf_counter() - t3
    return phases


def sglang_runs(args: argparse.Namespace, fp8: bool, work: Path) -> tuple[dict[str, float], int]:
    from rollout.sglang.weight_sync import TensorSync, push_update
    from rollout.sglang.worker import Worker

    model = make_model(seed=0).to_dtype(torch.bfloat16)
    server = start_sglang(args, work, "fp8" if fp8 else None)
    try:

        async def body() -> tuple[dict[str, float], int]:
            worker = Worker.for_server(server, timeout=600)
            runs, nbytes = [], 0
            try:
                for rep in range(args.reps + 1):
                    t0 = time.perf_counter()
                    update = build(model, 2 * rep + 1, fp8)
                    export = time.perf_counter() - t0
                    phases = {"export": export, **await sglang_phased(worker, update)}
                    update.version = 2 * rep + 2  # the plain push_update, alternated
                    phases["push_update"] = await push_update(TensorSync(), [worker], update)
                    phases["total"] = export + phases["push_update"]
                    nbytes = update.nbytes
                    if rep:
                        runs.append(phases)
            finally:
                await worker.client.close()
            return median_phases(runs), nbytes

        return asyncio.run(body())
    finally:
        server.stop()


def client_side_runs(args: argparse.Namespace, fp8: bool) -> tuple[dict[str, float], int]:
    """export + serialize of the tensor path, without a server (one that cannot start)."""
    from rollout.sglang.weight_sync import TensorSync

    model, sync, runs, nbytes = make_model(seed=0).to_dtype(torch.bfloat16), TensorSync(), [], 0
    for rep in range(args.reps + 1):
        t0 = time.perf_counter()
        update = build(model, rep + 1, fp8)
        t1 = time.perf_counter()
        for bucket in update.buckets:
            sync._payload(bucket)
        t2 = time.perf_counter()
        nbytes = update.nbytes
        if rep:
            runs.append({"export": t1 - t0, "serialize": t2 - t1, "total": t2 - t0})
    return median_phases(runs), nbytes


# --- report --------------------------------------------------------------------------------------
def row(path: str, dtype: str, phases: dict[str, float], nbytes: int, mem_s: float) -> dict:
    total = phases["total"]
    gbps, mem_gbps = nbytes / total / 1e9, nbytes / mem_s / 1e9
    return {
        "path": path,
        "dtype": dtype,
        "bytes": nbytes,
        "s_per_sync": total,
        "gbps": gbps,
        "memcpy_s": mem_s,
        "memcpy_gbps": mem_gbps,
        "memcpy_ratio": total / mem_s,
        "phases": phases,
    }


def print_table(rows: list[dict], params: int) -> None:
    print(f"\nmodel: {params / 1e6:.1f}M parameters (small-36M shape, vocab {VOCAB})")
    print("| path | dtype | MB/sync | s/sync | GB/s | memcpy GB/s | × memcpy time | phases (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        phases = ", ".join(f"{k} {v:.4f}" for k, v in r["phases"].items() if k != "total")
        print(
            f"| {r['path']} | {r['dtype']} | {r['bytes'] / 1e6:.1f} | {r['s_per_sync']:.4f} | "
            f"{r['gbps']:.2f} | {r['memcpy_gbps']:.2f} | {r['memcpy_ratio']:.1f} | {phases} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed syncs per path and dtype")
    parser.add_argument("--paths", nargs="+", default=["embedded", "sglang"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"])
    # 1: on 2 shared cores, 2 OpenMP threads stall at every parallel region under load
    # (bf16 export measured 1.58 s at 2 threads vs 0.18 s at 1, load 35-50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sglang-fp8-server", action="store_true", help="start an FP8 SGLang server (GPU)"
    )
    parser.add_argument("--sglang-python", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in args.paths:
        if name not in ("embedded", "sglang"):
            raise SystemExit(f"--paths: expected embedded and/or sglang, got {name!r}")
    for name in args.dtypes:
        if name not in ("bf16", "fp8"):
            raise SystemExit(f"--dtypes: expected bf16 and/or fp8, got {name!r}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; load {load_before}; "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    params = sum(p.numel() for p in make_model(seed=0).parameters())
    rows, skipped = [], {}
    if "embedded" in args.paths:
        import ray

        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=4, include_dashboard=False, namespace="bench_weight_sync")
        try:
            for dtype in args.dtypes:
                phases, nbytes = embedded_runs(args, dtype == "fp8")
                rows.append(row("embedded (Ray)", dtype, phases, nbytes, memcpy_s(nbytes, 9)))
                print(rows[-1], flush=True)
        finally:
            ray.shutdown()
    if "sglang" in args.paths:
        with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp:
            work = Path(tmp)
            build_toy_tokenizer(work / "ckpt", CORPUS, vocab_size=VOCAB)
            save_pretrained(make_model(seed=0).to_dtype(torch.bfloat16), work / "ckpt")
            for dtype in args.dtypes:
                try:
                    if dtype == "fp8" and not args.sglang_fp8_server:
                        raise RuntimeError(NO_CPU_FP8)
                    phases, nbytes = sglang_runs(args, dtype == "fp8", work)
                    path = "sglang tensor"
                except Exception as err:  # e.g. no FP8 kernels in SGLang's CPU build: say so
                    skipped[f"sglang {dtype}"] = f"{type(err).__name__}: {str(err)[-400:]}"
                    print(f"sglang {dtype}: server side not measured: {skipped[f'sglang {dtype}']}")
                    phases, nbytes = client_side_runs(args, dtype == "fp8")
                    path = "sglang tensor, client side only"
                rows.append(row(path, dtype, phases, nbytes, memcpy_s(nbytes, 9)))
                print(rows[-1], flush=True)
    print_table(rows, params)
    load_after = os.getloadavg()
    print(f"load before {load_before}, after {load_after}; torch threads {args.threads}")
    if args.out is not None:
        loads = [load_before, load_after]
        result = {"params": params, "rows": rows, "skipped": skipped, "load": loads}
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
