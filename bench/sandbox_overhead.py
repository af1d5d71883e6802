"""Benchmark: per-call cost of the code sandbox (bubblewrap) against a plain subprocess.

Each round runs every variant once, alternating, so all see the same machine load:

  plain        `python -I -B -c "print(1)"` as an asyncio subprocess: the floor
  weak         `Sandbox(allow_weak=True)` with bwrap hidden: rlimits + audit hook (+ unshare -n)
  bwrap        `Sandbox()`: bubblewrap namespaces, read-only root, private tmpfs, rlimits,
               plus a pids cgroup per run when running as root
  code reward  one `code` reward call: two bwrap sandboxes (solution, tests) and the relay
               for 3 tests

Prints wall ms per call (min, median, p90) and the overhead of bwrap over plain and weak. On
a loaded machine the min is the steadiest figure. (CPU time is not shown: rusage does not
see the processes inside bwrap's pid namespace.)
Usage:

    .venv/bin/python bench/sandbox_overhead.py [--reps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import numpy as np

from buffer.episode import Episode
from rewards import sandbox as sandbox_module
from rewards.builtins.code import CodeTestsReward
from rewards.sandbox import Sandbox

CODE = "print(1)\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


async def plain() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-B", "-c", CODE, stdout=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    assert proc.returncode == 0


def weak_sandbox() -> Sandbox:
    real = sandbox_module.bwrap_problem
    sandbox_module.bwrap_problem = lambda exe=None: "hidden by the benchmark"
    try:
        return Sandbox(allow_weak=True)
    finally:
        sandbox_module.bwrap_problem = real


def episode() -> Episode:
    return Episode.from_generation(
        prompt_ids=[1, 2],
        response_ids=[5, 6, 7],
        logprobs=np.full(3, -0.5),
        versions=[0, 0, 0],
        finish_reason="stop",
        metadata={"response_text": "def add(a, b):\n    return a + b\n", "tests": TESTS},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    bwrap, weak, reward = Sandbox(), weak_sandbox(), CodeTestsReward()
    print(f"bwrap isolation: {bwrap.isolation}; weak uses unshare -n: {weak.uses_unshare}")

    async def run_ok(sandbox: Sandbox) -> None:
        result = await sandbox.run(CODE)
        assert result.ok, result.stderr

    async def grade() -> None:
        assert (await reward(episode()))["pass_rate"] == 1.0

    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "plain": plain,
        "weak": lambda: run_ok(weak),
        "bwrap": lambda: run_ok(bwrap),
        "code reward": grade,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps + 2):
        for name, call in variants.items():
            start = time.perf_counter()
            asyncio.run(call())
            if rep >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start) * 1000)
    print(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs), reps {args.reps}")
    print("| variant | min ms | median ms | p90 ms |\n|---|---|---|---|")
    med = {name: statistics.median(values) for name, values in times.items()}
    low = {name: min(values) for name, values in times.items()}
    for name, values in times.items():
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"| {name} | {low[name]:.1f} | {med[name]:.1f} | {p90:.1f} |")
    for base in ("plain", "weak"):
        print(
            f"bwrap over {base}: min +{low['bwrap'] - low[base]:.1f} ms, median "
            f"+{med['bwrap'] - med[base]:.1f} ms per call"
        )


if __name__ == "__main__":
    main()
