"""The inference path (models/) of this tree against another tree's, each in its own process.

The workload is engine_vs_hf.py's batch 64 (glm4moe-toy, 64 prompts of 16-48 tokens, 32 new
tokens), run straight through `forward_cached` without the engine: one padded prefill of
all prompts, then greedy decode steps, one token per row. Each rep runs both trees, each in a
fresh process with PYTHONPATH set to its tree (its whole models/ package: decode.py and the
modules it calls), in alternating order; each phase is timed by that process's CPU clock (so
other jobs on the machine deschedule neither side). It also checks that both give the same
greedy tokens and prints the largest last-step logit difference.
(Before 3d9df8b it swapped decode_forward between two module copies in one process; since
forward_cached calls models/decode.py's own decode_forward, that swap timed one side twice.)

    .venv/bin/python bench/decode_before_after.py --against /path/to/other/tree [--reps 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]


def workload(preset: str, batch: int) -> tuple[torch.nn.Module, list[list[int]]]:
    from models import Glm4MoeForCausalLM, get_preset  # the tree on sys.path

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


def side(args: argparse.Namespace) -> None:
    """One tree's run (the one on PYTHONPATH): warm-up, then a timed run saved to args.out."""
    torch.set_num_threads(1)
    model, prompts = workload(args.preset, args.batch)
    generate(model, prompts, args.new)
    tokens, logits, pre, dec = generate(model, prompts, args.new)
    torch.save({"tokens": tokens, "logits": logits, "times": (pre, dec)}, args.out)


def run(tree: Path, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--side", "--out", str(out), "--against", str(tree)]
    cmd += ["--preset", args.preset, "--batch", str(args.batch), "--new", str(args.new)]
    subprocess.run(cmd, env=env, check=True, cwd=tree)
    return torch.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, required=True, help="another tree (its models/)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--preset", default="glm4moe-toy")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return side(args)
    torch.set_num_threads(1)  # as each side runs
    if not (args.against / "models" / "decode.py").is_file():
        raise SystemExit(f"--against: {args.against}/models/decode.py does not exist")
    trees = {"this": ROOT, "against": args.against.resolve()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in trees if rep % 2 == 0 else reversed(trees):
                last[name] = run(trees[name], args, Path(tmp) / f"{name}.pt")
                times[name].append(last[name]["times"])
    same = torch.equal(last["this"]["tokens"], last["against"]["tokens"])
    diff = (last["this"]["logits"] - last["against"]["logits"]).abs().max().item()
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
