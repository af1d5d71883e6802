"""One-GPU check: Physarum's CUDA paths measured against transformers, in ONE process.

No Ray, no Redis: the embedded engine, the torch training backend and the weight-update
message are used as a library. It prints ONE table, every figure measured in this run:

  decode bf16            embedded-engine tokens/s vs transformers `generate`, same weights
  decode fp8             the same, both on the blockwise-FP8 (e4m3, 128x128) checkpoint
  GRPO train step bf16   TorchBackend.train on synthetic GRPO groups: tokens/s, seconds/step
  weight sync            trainer -> engine, one update: seconds and bytes, three ways (bf16
                         with the payload on the device, bf16 through host bytes as a
                         cross-process update travels, FP8 into an FP8 engine)

At start it checks what it needs (Python >= 3.10, torch, CUDA unless --device cpu,
transformers with Glm4MoeForCausalLM) and pip-installs only small missing pure-python
dependencies of our library (pydantic, pyyaml, safetensors, numpy; accelerate, which
transformers needs to load an FP8 checkpoint), saying so. --no-install turns that off.

    scripts/gpu_check.sh                                   # on a GPU machine (cuda, small)
    python bench/gpu_check.py --device cpu --size tiny     # here, a minute on a CPU

Sizes: `small` is a ~0.2B-parameter GLM-4 MoE (8 layers, 32 experts top-4) that a GPU runs
in a few minutes; `tiny` is the laptop toy preset with tiny workloads (for the CPU test).
A figure that could not be measured (e.g. transformers cannot load FP8 here) is printed as
n/a with the reason, never estimated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a plain checkout (nothing installed)
    sys.path.insert(0, str(REPO))

from bench.gpu_check_report import Row, describe, table  # noqa: E402
from bench.gpu_check_setup import CheckError, preflight  # noqa: E402
from bench.gpu_check_workload import SIZES, Size, synthetic_groups  # noqa: E402

# ---- the measurements ------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Callable[[], int], repeats: int, device: Any) -> tuple[float, int]:
    """Best wall time of `repeats` calls of fn (synchronised) and fn's count."""
    best, count = float("inf"), 0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        count = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, count


def _load_hf(path: Path, dtype: Any, device: Any, *, fp8: bool = False) -> tuple[Any, str]:
    """transformers' Glm4MoeForCausalLM from an HF directory on `device`; (model, "") or
    (None, why not). An FP8 directory is loaded by transformers' own block-FP8 support."""
    import transformers

    cls = transformers.Glm4MoeForCausalLM
    # transformers places a quantized model itself; a plain one is moved (and cast) below
    kwargs: dict[str, Any] = {"device_map": str(device)} if fp8 and device.type == "cuda" else {}
    try:
        try:
            model = cls.from_pretrained(str(path), dtype=dtype, **kwargs)
        except TypeError:  # transformers before `dtype=`
            model = cls.from_pretrained(str(path), torch_dtype=dtype, **kwargs)
    except Exception as err:  # noqa: BLE001  (reported in the table, never hidden)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    # a plain model is cast too (an old transformers may ignore the dtype argument); an FP8
    # one only moved, or its float8 weights would be cast
    model = (model.to(device) if fp8 else model.to(device=device, dtype=dtype)).eval()
    model.generation_config.pad_token_id = 0
    return model, ""


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def decode_row(
    kind: str, bf16_dir: Path, fp8_dir: Path, size: Size, device: Any, budget: Callable[[], float]
) -> tuple[Row, Any]:
    """Engine vs HF generate on the bf16 or the FP8 weights. Returns the row and the engine
    (the caller shuts it down). The FP8 checkpoint is written here for transformers."""
    import torch

    from bench.engine_vs_hf import engine_generate, hf_generate, make_prompts
    from models.checkpoint import from_pretrained, save_pretrained
    from rollout.embedded import EmbeddedEngine

    prompts = make_prompts(size.decode_batch, int(size.model.get("vocab_size", 512)))
    new = size.new_tokens
    detail = (
        f"batch {len(prompts)}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
        f"tokens, {new} new (prefill + decode), greedy, EOS ignored; best of {size.repeats}"
    )
    model = from_pretrained(bf16_dir, dtype=torch.bfloat16, device=device)
    engine = EmbeddedEngine(
        model, max_running=len(prompts), context_len=max(map(len, prompts)) + new,
        eos_token_ids=[], fp8=kind == "fp8", name=f"gpu-check-{kind}",
    )  # fmt: skip
    if kind == "fp8":
        save_pretrained(engine.model, fp8_dir)  # the same FP8 weights for transformers
    ours: list[list[int]] = []
    engine_generate(engine, prompts[:2], 1, new_tokens=2, temperature=0)  # warm-up
    t_ours, n_ours = _best(
        lambda: engine_generate(engine, prompts, 1, new_tokens=new, temperature=0),
        size.repeats,
        device,
    )
    engine_generate(engine, prompts, 1, new_tokens=new, temperature=0, outputs=ours)
    hf, why = None, "skipped: the time budget is nearly spent"
    if budget() > 60:
        fp8 = kind == "fp8"
        hf, why = _load_hf(fp8_dir if fp8 else bf16_dir, torch.bfloat16, device, fp8=fp8)
    hf_rate = None
    if hf is not None:
        theirs: list[list[int]] = []
        gen: dict[str, Any] = dict(new_tokens=new, temperature=0, device=device)
        hf_generate(hf, prompts[:2], 1, 1, **(gen | {"new_tokens": 2}))  # warm-up
        t_hf, n_hf = _best(lambda: hf_generate(hf, prompts, 1, 1, **gen), size.repeats, device)
        hf_generate(hf, prompts, 1, 1, **gen, outputs=theirs)
        hf_rate = n_hf / t_hf
        detail += f"; greedy tokens equal to HF's: {_agreement(ours, theirs):.1%}"
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if kind == "fp8":  # say what the figure is: FP8 weights at rest, bf16 matmuls
        detail += "; the engine dequantizes FP8 weights once per weight version"
    label = "decode bf16" if kind == "bf16" else "decode fp8 (e4m3, 128x128 blocks)"
    return Row(label, "tok/s", n_ours / t_ours, hf_rate, detail, note=why), engine


def train_rows(bf16_dir: Path, size: Size, device: Any) -> tuple[list[Row], Any]:
    """Median GRPO step of the torch backend (fp32 master weights, bf16 autocast). Returns
    the rows and the backend (the trainer side of the weight sync)."""
    import torch

    from configs import AlgorithmConfig, TrainerConfig
    from models.checkpoint import from_pretrained
    from trainer.batch import build_rl_step
    from trainer.torch_backend import TorchBackend

    model = from_pretrained(bf16_dir, dtype=torch.float32, device=device)
    budget = 8192 if device.type == "cuda" else 1024
    cfg = TrainerConfig(lr=1e-5, dtype="bfloat16", micro_batch_tokens=budget, steps=10**6)
    backend = TorchBackend(model, cfg, AlgorithmConfig(advantage="grpo", loss_agg="token_mean"))
    vocab = model.config.vocab_size
    groups = synthetic_groups(
        size.train_prompts, size.train_samples, size.prompt_len, size.response_len, vocab, 0
    )
    times: list[float] = []
    tokens = 0
    for i in range(size.train_steps + 1):  # the first step warms up
        step = build_rl_step(groups, micro_batch_tokens=cfg.micro_batch_tokens)
        tokens = sum(b.num_tokens for b in step.micro_batches)
        _sync(device)
        t0 = time.perf_counter()
        metrics = backend.train(step)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        if not all(map(_finite, metrics.values())):
            raise RuntimeError(f"GRPO step {i}: non-finite metrics {metrics}")
    step_s = statistics.median(times)
    seqs = size.train_prompts * size.train_samples
    detail = (
        f"{size.train_prompts} prompts x {size.train_samples} samples, {tokens} tokens in "
        f"{len(step.micro_batches)} micro-batch(es); fp32 master + AdamW, bf16 autocast; "
        f"median of {len(times)} steps"
    )
    rows = [
        Row("GRPO train step bf16", "tok/s", tokens / step_s, detail=detail),
        Row("GRPO train step bf16", "s/step", step_s, detail=f"{seqs} sequences per step"),
    ]
    return rows, backend


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def sync_rows(backend: Any, engine: Any, fp8_dir: Path, size: Size, device: Any) -> list[Row]:
    """One trainer -> engine update each way; checks the engine then holds the weights."""
    import torch

    from models.checkpoint import from_pretrained
    from models.weight_update import decode_weight_update, encode_weight_update
    from rollout.embedded import EmbeddedEngine

    rows: list[Row] = []

    def one(name: str, target: Any, **kw: Any) -> None:
        host = kw.pop("host", False)
        _sync(device)
        t0 = time.perf_counter()
        update = backend.weight_update(**kw)
        if host:  # the bytes a cross-process update carries (Ray object, HTTP body)
            update = decode_weight_update(bytearray(encode_weight_update(update)))
        target.submit_update(update).result()
        _sync(device)
        seconds = time.perf_counter() - t0
        where = str(update.buckets[0].payload.device) if update.buckets else "-"
        mib, count = update.nbytes / 2**20, len(update.buckets)
        detail = f"{mib:.1f} MiB in {count} bucket(s), payload on {where}"
        rows.append(Row(name, "s", seconds, detail=detail, extra={"bytes": float(update.nbytes)}))

    version = backend.version
    one("weight sync bf16, in process (payload on the device)", engine,
        dtype=torch.bfloat16, device=device, version=version)  # fmt: skip
    ref = backend.model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    got = engine.model.model.embed_tokens.weight.detach()
    if not torch.equal(ref, got):
        raise RuntimeError("weight sync: the engine's embedding differs from the trainer's")
    one("weight sync bf16, host bytes (cross-process path)", engine,
        dtype=torch.bfloat16, version=version, host=True)  # fmt: skip
    fp8_engine = EmbeddedEngine(
        from_pretrained(fp8_dir, dtype=torch.bfloat16, device=device, keep_fp8=True),
        max_running=2, context_len=64, eos_token_ids=[], name="gpu-check-fp8-sync",
    )  # fmt: skip
    try:
        block = (128, 128)
        one("weight sync fp8 -> FP8 engine, in process", fp8_engine,
            fp8_block=block, dtype=torch.bfloat16, device=device, version=version)  # fmt: skip
    finally:
        fp8_engine.shutdown()
    return rows


SECTIONS = (
    ("decode bf16", "tok/s"),
    ("decode fp8 (e4m3, 128x128 blocks)", "tok/s"),
    ("GRPO train step bf16", "tok/s"),
    ("weight sync", "s"),
)


def _failed(name: str, unit: str, err: BaseException) -> Row:
    traceback.print_exc()
    return Row(name, unit, None, detail="FAILED", note=f"{type(err).__name__}: {err}"[:200])


def run(device_setting: str, size_name: str, *, time_budget_s: float = 420.0) -> list[Row]:
    """Every measurement, in order. A section that raises becomes a FAILED row (with the
    traceback on stderr) and the others still run, so one GPU run always yields a table."""
    import torch

    from models import Glm4MoeForCausalLM, get_preset
    from models.checkpoint import save_pretrained
    from models.device import resolve_device

    start = time.monotonic()

    def left() -> float:
        return time_budget_s - (time.monotonic() - start)

    def progress(what: str) -> None:
        print(f"gpu_check: {time.monotonic() - start:5.0f} s  {what}", flush=True)

    size = SIZES[size_name]
    visible = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else None
    device = resolve_device(device_setting, gpu_ids=visible)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = Glm4MoeForCausalLM(get_preset("glm4moe-toy", **size.model))
    model.init_weights(torch.Generator().manual_seed(0))
    rows: list[Row] = []
    engines: dict[str, Any] = {}
    backend = None
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        bf16_dir, fp8_dir = Path(tmp) / "bf16", Path(tmp) / "fp8"
        save_pretrained(model.to_dtype(torch.bfloat16), bf16_dir)
        del model
        try:
            for kind, (name, unit) in zip(("bf16", "fp8"), SECTIONS[:2], strict=True):
                progress(f"{name}: engine and transformers generate")
                try:
                    row, engines[kind] = decode_row(kind, bf16_dir, fp8_dir, size, device, left)
                    rows.append(row)
                except Exception as err:  # noqa: BLE001
                    rows.append(_failed(name, unit, err))
            progress("GRPO train step")
            try:
                train, backend = train_rows(bf16_dir, size, device)
                rows += train
            except Exception as err:  # noqa: BLE001
                rows.append(_failed(*SECTIONS[2], err))
            progress("weight sync")
            try:
                if backend is None or "bf16" not in engines or not fp8_dir.is_dir():
                    raise RuntimeError("needs the trainer, the bf16 engine and the FP8 weights")
                rows += sync_rows(backend, engines["bf16"], fp8_dir, size, device)
            except Exception as err:  # noqa: BLE001
                rows.append(_failed(*SECTIONS[3], err))
        finally:
            for engine in engines.values():
                engine.shutdown()
    progress("done")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: small on "
                    "cuda, tiny on cpu")  # fmt: skip
    ap.add_argument("--no-install", action="store_true", help="never pip-install anything")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; rows still "
                    "to come when it is nearly spent are skipped and say so")  # fmt: skip
    args = ap.parse_args(argv)
    size = args.size or ("small" if args.device == "cuda" else "tiny")
    try:
        versions = preflight(args.device, install=not args.no_install)
    except CheckError as err:
        print(f"gpu_check: cannot run: {err}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    header = describe(args.device, size, SIZES[size].model, versions)
    rows = run(args.device, size, time_budget_s=args.time_budget)
    print()
    print(header)
    print(table(rows))
    failed = [r.name for r in rows if r.ours is None]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
