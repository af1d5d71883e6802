"""The decode path (models/decode.py) of this tree against another tree's, in one process.

The workload is engine_vs_hf.py's batch 64 (glm4moe-toy, 64 prompts of 16-48 tokens, 32 new
tokens), run straight through `forward_cached` without the engine: one padded prefill of
all prompts, then greedy decode steps, one token per row. Both sides run on the same model,
weights and KV cache shape; `decode_forward` is swapped between the two modules, the order
alternates every rep, and each phase is timed by this process's CPU clock (so other jobs on
the machine deschedule neither side). First it checks that both give the same greedy tokens
and prints the largest logit difference.

    .venv/bin/python bench/decode_before_after.py --against /path/to/other/tree [--reps 7]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import models.glm4moe as glm4moe  # noqa: E402
from models import Glm4MoeForCausalLM, get_preset  # noqa: E402


def load_decode(tree: Path, name: str) -> ModuleType:
    """`tree`/models/decode.py as a module of its own (its imports resolve to this tree)."""
    path = tree / "models" / "decode.py"
    if not path.is_file():
        raise SystemExit(f"--against: {path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def workload(preset: str, batch: int) -> tuple[Glm4MoeForCausalLM, list[list[int]]]:
    model = Glm4MoeForCausalLM(get_preset(preset, initializer_range=0.2))
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # engine_vs_hf.make_prompts
    lengths = torch.randint(16, 49, (batch,), generator=g).tolist()
    vocab = model.config.vocab_size
    return model.eval(), [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def generate(model, prompts: list[list[int]], new: int) -> tuple[Tensor, Tensor, float, float]:
    """Greedy: (tokens [B, new], last logits, prefill CPU s, decode CPU s)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    cache = model.new_kv_cache(b, width + new)
    ids = torch.zeros(b, width, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    pos = torch.tensor([len(p) for p in prompts])
    slots, one = torch.arange(b), torch.ones(b, dtype=torch.int64)
    weights = model.decode_weights()
    t0 = time.process_time()
    logits = model.forward_cached(ids, slots, torch.zeros_like(pos), pos, cache, weights=weights)
    t1 = time.process_time()
    out = [logits.argmax(-1)]
    for _ in range(new - 1):
        logits = model.forward_cached(out[-1][:, None], slots, pos, one, cache, weights=weights)
        out.append(logits.argmax(-1))
        pos = pos + 1
    t2 = time.process_time()
    return torch.stack(out, 1), logits, t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, required=True, help="another tree (its models/)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--preset", default="glm4moe-toy")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sides = {
        "this": load_decode(Path(__file__).resolve().parents[1], "decode_this"),
        "against": load_decode(args.against.resolve(), "decode_against"),
    }
    model, prompts = workload(args.preset, args.batch)
    runs = {}
    for name, module in sides.items():
        glm4moe.decode_forward = module.decode_forward
        generate(model, prompts, args.new)  # warm-up
        runs[name] = generate(model, prompts, args.new)
    same = torch.equal(runs["this"][0], runs["against"][0])
    diff = (runs["this"][1] - runs["against"][1]).abs().max().item()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for rep in range(args.reps):
        for name in sides if rep % 2 == 0 else reversed(sides):
            glm4moe.decode_forward = sides[name].decode_forward
            times[name].append(generate(model, prompts, args.new)[2:])
    print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{args.preset}, batch {args.batch}, prompts 16-48 tokens, {args.new} new tokens, greedy, "
        f"torch threads {torch.get_num_threads()}, CPU clock, {args.reps} alternated reps; "
        f"against {args.against}"
    )
    print(f"same greedy tokens: {same}; largest last-step logit difference {diff:.2e}")
    for name, ts in times.items():
        pre, dec = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(
            f"  {name:<8} prefill {pre * 1e3:7.1f} ms, decode {dec * 1e3:7.1f} ms "
            f"({dec / (args.new - 1) * 1e3:.2f} ms a step), medians"
        )
    ratios = [sum(a) / sum(t) for t, a in zip(times["this"], times["against"], strict=True)]
    print(
        f"  against / this, prefill + decode, per rep: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
