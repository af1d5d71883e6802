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
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a plain checkout (nothing installed)
    sys.path.insert(0, str(REPO))

# module -> pip requirement: our library's small dependencies (what models/, configs/,
# buffer.episode, trainer/ and rollout/embedded import besides torch)
REQUIRED = {
    "pydantic": "pydantic>=2.6",
    "yaml": "pyyaml>=6",
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy>=1.26",
}
OPTIONAL = {"accelerate": "accelerate"}  # transformers loads FP8 checkpoints only with it


class CheckError(RuntimeError):
    """The machine lacks something the check needs (the message says what and how to fix)."""


@dataclass(frozen=True)
class Size:
    """Model and workload sizes of one run."""

    model: dict[str, Any]
    decode_batch: int
    new_tokens: int
    train_prompts: int
    train_samples: int
    prompt_len: int
    response_len: int
    train_steps: int
    repeats: int


_SMALL_MODEL = dict(
    vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=4096,
    use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=32, n_shared_experts=1,
    num_experts_per_tok=4, routed_scaling_factor=1.0, norm_topk_prob=True,
    tie_word_embeddings=False,
)  # fmt: skip

SIZES: dict[str, Size] = {
    "small": Size(_SMALL_MODEL, 64, 128, 8, 8, 256, 256, 5, 3),
    "tiny": Size({}, 4, 8, 2, 4, 12, 8, 2, 1),  # the glm4moe-toy preset as it is
}


@dataclass
class Row:
    """One line of the table. ours/hf: the figure (None = not measured: see `note`)."""

    name: str
    unit: str
    ours: float | None
    hf: float | None = None
    detail: str = ""
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.hf is None or self.hf == 0:
            return None
        return self.ours / self.hf if self.unit.endswith("/s") else self.hf / self.ours


# ---- preflight (stdlib only until torch is known to be there) --------------------------------


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _pip_install(requirements: list[str]) -> None:
    print(f"gpu_check: pip-installing missing small dependencies: {' '.join(requirements)}")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*cmd, *requirements], check=True)
    importlib.invalidate_caches()


def preflight(device: str, *, install: bool, want_fp8_hf: bool = True) -> dict[str, str]:
    """Check Python, torch (+ CUDA unless device is cpu), transformers and our small deps;
    install the missing small ones when `install`. Returns versions for the report."""
    if sys.version_info < (3, 10):  # noqa: UP036  (a GPU machine's python may be older)
        raise CheckError(f"Python >= 3.10 needed, this is {sys.version.split()[0]}")
    if not _have("torch"):
        raise CheckError("torch is not installed: install a CUDA build of torch first")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CheckError(
            f"--device cuda: torch {torch.__version__} sees no GPU (torch.version.cuda="
            f"{torch.version.cuda}); run with --device cpu to check the CPU path"
        )
    if not _have("transformers"):
        raise CheckError("transformers is not installed (pip install 'transformers>=4.57')")
    import transformers

    if not hasattr(transformers, "Glm4MoeForCausalLM"):
        raise CheckError(
            f"transformers {transformers.__version__} has no Glm4MoeForCausalLM (need >= 4.57)"
        )
    missing = [req for mod, req in REQUIRED.items() if not _have(mod)]
    if missing:
        if not install:
            raise CheckError(f"missing dependencies {missing} (run without --no-install)")
        _pip_install(missing)
    if want_fp8_hf and device == "cuda":
        optional = [req for mod, req in OPTIONAL.items() if not _have(mod)]
        if optional and install:
            try:
                _pip_install(optional)
            except subprocess.CalledProcessError as err:
                print(f"gpu_check: could not install {optional} ({err}); HF's FP8 row is n/a")
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
    }


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


def synthetic_groups(
    n_prompts: int, n_samples: int, prompt_len: int, response_len: int, vocab: int, seed: int
) -> list[Any]:
    """GRPO-shaped episode groups of random tokens: one prompt per group, n responses of
    random length in [response_len/2, response_len], rewards 0/1 (never all equal)."""
    import numpy as np
    import torch

    from buffer.episode import Episode, EpisodeGroup

    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_prompts):
        prompt = torch.randint(1, vocab, (prompt_len,), generator=g).tolist()
        episodes = []
        for k in range(n_samples):
            n = int(torch.randint(max(response_len // 2, 1), response_len + 1, (1,), generator=g))
            episodes.append(
                Episode(
                    prompt_ids=prompt,
                    response_ids=torch.randint(1, vocab, (n,), generator=g).tolist(),
                    loss_mask=np.ones(n),
                    rollout_logprobs=np.zeros(n),
                    versions=np.zeros(n),
                    reward=float(k % 2),
                )
            )
        groups.append(EpisodeGroup(f"p{i}", episodes))
    return groups


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


# ---- report ----------------------------------------------------------------------------------


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "s" or unit == "s/step":
        return f"{x:.4f}" if x < 1 else f"{x:.2f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(rows: list[Row]) -> str:
    """The rows as one Markdown table (ratio: ours/HF for rates, HF/ours for times)."""
    lines = [
        "| measurement | unit | Physarum | HF transformers | Physarum vs HF | detail |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        hf = _fmt(r.hf, r.unit) if r.hf is not None else ("n/a" if r.note else "-")
        detail = r.detail + (f" (HF: {r.note})" if r.note else "")
        lines.append(
            f"| {r.name} | {r.unit} | {_fmt(r.ours, r.unit)} | {hf} | {ratio} | {detail} |"
        )
    return "\n".join(lines)


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


def describe(device_setting: str, size_name: str, versions: dict[str, str]) -> str:
    import torch

    from models import count_params, get_preset

    size = SIZES[size_name]
    total, active = count_params(get_preset("glm4moe-toy", **size.model))
    if device_setting == "cuda":
        card = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        where = f"{card} ({mem:.0f} GiB)"
    else:
        where = f"CPU ({torch.get_num_threads()} torch threads)"
    vs = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        f"device: {where}\n{vs}\n"
        f"model: GLM-4 MoE '{size_name}', {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M "
        "active), random init, same weights on both sides"
    )


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
    header = describe(args.device, size, versions)
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
