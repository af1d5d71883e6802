"""bench/long_tail.py's results: one mode's run read back from its metrics, and the table.

`Run` holds the trainer's per-step records after --skip and derives the columns (trained
tokens/s, idle fraction, staleness histogram, the rollout-side line, held-out reward);
`print_table` prints every mode against the sync run of the same script run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from async_vs_sync import StepStats  # bench/ is on sys.path


@dataclass
class Run(StepStats):
    mode: str
    records: list[dict[str, Any]]  # per-step trainer records after --skip
    evals: list[dict[str, Any]]  # records holding eval/accuracy, in step order
    load: tuple[float, float]
    wall_s: float

    @property
    def tokens(self) -> float:
        return sum(r["data/episodes"] * r["data/response_len"] for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / sum(r["perf/step_s"] for r in self.records)

    @property
    def idle(self) -> float:
        return sum(r["perf/wait_s"] for r in self.records) / sum(
            r["perf/step_s"] for r in self.records
        )

    @property
    def staleness_hist(self) -> dict[int, int]:
        """Groups trained per staleness over the measured steps (cumulative counters' diff)."""

        def hist(record: dict[str, Any]) -> dict[int, float]:
            prefix = "buffer/staleness_hist/"
            return {int(k[len(prefix) :]): v for k, v in record.items() if k.startswith(prefix)}

        first, last = hist(self.before), hist(self.records[-1])
        return {k: int(v - first.get(k, 0)) for k, v in sorted(last.items())}

    before: dict[str, Any] | None = None  # the last skipped record (histogram baseline)
    lengths: np.ndarray | None = None  # generated tokens of the final held-out eval
    cpu: dict[str, float] | None = None  # idle cores and each service's busy cores (CpuSampler)

    def delta(self, key: str) -> float:
        """A cumulative counter's growth over the measured steps (0 when not reported)."""
        return self.records[-1].get(key, 0.0) - (self.before or {}).get(key, 0.0)

    @property
    def rollout_line(self) -> str:
        """The rollout side over the measured steps: generated tokens per second of wall
        time and per CPU-second of the rollout actor, forwards, mean decode batch, stale
        groups cancelled in flight / dropped by the trainer."""
        wall = sum(r["perf/step_s"] for r in self.records)
        gen = self.delta("rollout/generated_tokens")
        cpu_s = self.cpu["rollout"] * wall if self.cpu else float("nan")
        decode = self.delta("rollout/engine_num_decode_forwards")
        batch = self.delta("rollout/engine_num_decode_rows") / decode if decode else float("nan")
        return (
            f"{self.mode:<10}gen {gen:>6.0f} tok, {gen / wall:>5.0f}/s, "
            f"{gen / cpu_s:>5.0f}/rollout CPU-s; forwards "
            f"{self.delta('rollout/engine_num_forwards'):>5.0f}, mean decode batch {batch:>5.1f};"
            f" stale groups cancelled {self.delta('rollout/groups_stale_aborted'):.0f}, "
            f"dropped {self.delta('buffer/drops_stale'):.0f}"
        )

    @property
    def cost_line(self) -> str:
        """CPU milliseconds per trained step and per 1,000 trained tokens of each service
        (CpuSampler's rates over the measured steps' wall time): what a mode spends to train
        a token, which the machine's load inflates far less than wall-clock ratios do."""
        wall = sum(r["perf/step_s"] for r in self.records)
        cpu = self.cpu or {}
        roles = ("trainer", "rollout", "driver", "redis")
        per_step = {k: 1e3 * cpu.get(k, float("nan")) * wall / len(self.records) for k in roles}
        per_ktok = {k: 1e6 * cpu.get(k, float("nan")) * wall / self.tokens for k in roles}
        total = sum(per_ktok.values())
        return (
            f"{self.mode:<10}"
            + "  ".join(f"{k} {per_step[k]:5.1f} ({per_ktok[k]:5.1f})" for k in roles)
            + f"  sum {sum(per_step.values()):6.1f} ({total:5.1f})"
        )

    @property
    def producer_line(self) -> str:
        """The producer over the measured steps: mean groups in flight, the share of time the
        staleness quota stopped leasing, groups left in the buffer at the last step."""
        span = self.records[-1]["time"] - (self.before or self.records[0])["time"]
        in_flight = self.delta("rollout/in_flight_group_s") / span
        quota = self.delta("rollout/quota_wait_s") / span
        left = self.records[-1].get("buffer/groups_unconsumed", float("nan"))
        return (
            f"{self.mode:<10}groups in flight {in_flight:5.1f} (mean), quota-bound "
            f"{quota:4.2f} of the time, groups ready in the buffer at the end {left:.0f}"
        )

    @property
    def accuracy(self) -> tuple[float, float]:
        """Held-out exact answers (reward 1) at the start and the end."""
        return self.evals[0]["eval/accuracy"], self.evals[-1]["eval/accuracy"]

    @property
    def reward(self) -> tuple[float, float]:
        """Held-out mean reward (share of leading items right) at the start and the end."""
        return self.evals[0]["eval/reward_mean"], self.evals[-1]["eval/reward_mean"]


def read_run(mode: str, path: Path, skip: int, load: tuple, wall: float) -> Run:
    steps, evals = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "perf/step_s" in record:
            steps.append(record)
        if "eval/accuracy" in record:
            evals.append(record)
    measured = [r for r in steps if r["step"] > skip]
    if len(measured) < 2 or len(evals) < 2:
        raise RuntimeError(f"{path}: {len(measured)} measured steps, {len(evals)} evals")
    before = [r for r in steps if r["step"] <= skip]
    return Run(mode, measured, evals, load, wall, before[-1] if before else {})


def generated_lengths(run_dir: Path, tok: Any) -> np.ndarray:
    """Response tokens (+1 for the stop token) of the final held-out eval's samples."""
    last = max((run_dir / "eval").glob("step_*.jsonl"), key=lambda p: int(p.stem[5:]))
    records = [json.loads(line) for line in last.read_text().splitlines()]
    return np.array(
        [
            len(tok.encode(r["response"], add_special_tokens=False))
            + (r["finish_reason"] == "stop")
            for r in records
        ]
    )


def print_table(runs: list[Run]) -> None:
    sync = next((r for r in runs if r.mode == "sync"), None)
    gen, train = (sync.wait_s, sync.busy_s) if sync else (float("nan"), float("nan"))
    bound = max(gen, train)
    print(
        f"\ngeneration/step = sync median trainer wait {gen:.3f} s; training/step = sync median "
        f"busy {train:.3f} s; max = {bound:.3f} s"
    )
    print(
        f"{'mode':<9}{'tok/s':>7}{'x sync':>7}{'step s':>8}{'/max(g,t)':>10}{'idle':>6}"
        f"{'tokens':>8}{'multi-v':>8}  {'staleness hist':<18}{'held-out reward':>15}"
        f"{'exact':>14}  load"
    )
    for r in runs:
        speed = r.tokens_per_s / sync.tokens_per_s if sync else float("nan")
        hist = " ".join(f"{k}:{v}" for k, v in r.staleness_hist.items())
        acc0, acc1 = r.accuracy
        rew0, rew1 = r.reward
        multi = r.records[-1].get("rollout/multi_version_episodes", float("nan"))
        print(
            f"{r.mode:<9}{r.tokens_per_s:>7.0f}{speed:>7.2f}{r.step_s:>8.3f}"
            f"{r.step_s / bound:>10.2f}{r.idle:>6.2f}{r.tokens:>8.0f}{multi:>8.0f}  "
            f"{hist:<18}{rew0:>7.3f}->{rew1:.3f}{acc0:>7.3f}->{acc1:.3f}  "
            f"{r.load[0]:.1f}->{r.load[1]:.1f}"
        )
    print(
        "\nper mode: generated tokens of the final held-out greedy eval (p50 / p90 / p99 / max);"
        " while the measured steps ran: the machine's idle cores and the cores the trainer and"
        " rollout actors kept busy (no idle core = the two services cannot overlap)"
    )
    for r in runs:
        p50, p90, p99 = np.percentile(r.lengths, [50, 90, 99])
        cpu = r.cpu
        print(
            f"{r.mode:<9}{p50:>5.0f}{p90:>5.0f}{p99:>5.0f}{r.lengths.max():>5}   idle "
            f"{cpu['idle']:.2f}  trainer {cpu['trainer']:.2f}  rollout {cpu['rollout']:.2f}"
        )
    print(
        "\nper mode, rollout side over the measured steps (its throughput bounds the async"
        " modes): tokens of the groups generated to the end (trained, dropped or left over)"
    )
    for r in runs:
        print(r.rollout_line)
    for r in runs:
        print(r.producer_line)
    print(
        "\nper mode, CPU ms per trained step of each service (in brackets: per 1,000 trained "
        "tokens); Ray's own daemons and other users are left out"
    )
    for r in runs:
        print(r.cost_line)
    asyncs = [r for r in runs if r.mode != "sync"]
    if sync and asyncs:
        best = max(asyncs, key=lambda r: r.tokens_per_s)
        gap = 100 * (best.reward[1] - sync.reward[1])
        print(
            f"\nbest async mode {best.mode}: {best.tokens_per_s / sync.tokens_per_s:.2f}x sync "
            f"trained tok/s (target >= 2), step {best.step_s / bound:.2f} x max(gen, train) "
            f"(target <= 1.15), held-out reward {gap:+.1f} points vs sync (target within 3)"
        )


def print_reps(reps: list[list[Run]]) -> None:
    """Each async mode against the sync run of the same rep (trained tok/s, held-out reward),
    per rep and the median: the figure to quote when single runs scatter."""
    print(f"\n== over {len(reps)} reps: x sync trained tok/s per rep (median); held-out reward")
    by_mode: dict[str, list[Run]] = {}
    for runs in reps:
        for r in runs:
            by_mode.setdefault(r.mode, []).append(r)
    syncs = by_mode.get("sync")
    if syncs is None:
        print("  no sync mode: nothing to compare against")
        return
    for mode, runs in by_mode.items():
        if mode == "sync":
            continue
        ratios = [r.tokens_per_s / s.tokens_per_s for r, s in zip(runs, syncs, strict=True)]
        gaps = [100 * (r.reward[1] - s.reward[1]) for r, s in zip(runs, syncs, strict=True)]
        per_rep = ", ".join(f"{x:.2f}" for x in ratios)
        print(
            f"  {mode:<9} {per_rep}  (median {statistics.median(ratios):.2f}x; target >= 2); "
            f"reward vs sync {statistics.median(gaps):+.1f} points (median)"
        )
