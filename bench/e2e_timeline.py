"""Where a Physarum step of bench/e2e_vs_trl.py goes: the trainer's phases, the rollout
engine's phases and the CPU each process spent, per step, over the measured steps of one run.

- Trainer, wall ms: medians of its `perf/*` records (between = the weight export and Ray's
  hand-over since the previous step, wait = for episode groups, build, train =
  `backend.train`, after = forensics and the version publish).
- Trainer thread, CPU ms (`perf/cpu_*`): export, take (buffer reads, decoding), build, train,
  after.
- Rollout engine thread, wall ms: medians of the per-step increments of its cumulative
  `rollout/engine_time_*` counters.
- CPU ms per step of each process (`job_cpu.CpuSampler`) and the machine's idle cores. On two
  cores their sum over 2 is a floor for the step: when it is close to the step time, the step
  is bound by the CPU of the whole job, and a millisecond saved in any process saves about
  half a millisecond of step.
"""

from __future__ import annotations

import statistics
from typing import Any

from job_cpu import ROLES, CpuSampler  # bench/ is on sys.path

TRAINER_PHASES = ("between_steps", "wait", "build", "train", "after_train")
TRAINER_CPU = ("export", "take", "build", "train", "after_train")  # perf/cpu_<phase>_s
ENGINE_PHASES = ("step", "prefill", "decode", "sample", "update", "commands")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_timeline(
    records: list[dict[str, Any]], cpu: CpuSampler | None, skip: int
) -> dict[str, float]:
    """Per-step medians (ms) of one run's trainer records after `skip` warm-up steps; with a
    sampler, CPU ms per step of each role, their sum and the mean idle cores of the machine."""
    steps = sorted((r for r in records if "perf/step_s" in r), key=lambda r: r["step"])[skip:]
    out: dict[str, float] = {}
    times = [r["time"] for r in steps]
    out["step"] = _median([b - a for a, b in zip(times, times[1:])]) * 1e3
    for phase in TRAINER_PHASES:
        key = "train/time/train_step_s" if phase == "train" else f"perf/{phase}_s"
        out[f"trainer/{phase}"] = _median([r[key] for r in steps if key in r]) * 1e3
    for phase in TRAINER_CPU:  # the trainer thread's CPU (records of this code on)
        key = f"perf/cpu_{phase}_s"
        out[f"trainer_cpu/{phase}"] = _median([r[key] for r in steps if key in r]) * 1e3
    for phase in ENGINE_PHASES:
        key = f"rollout/engine_time_{phase}_s"
        deltas = [b[key] - a[key] for a, b in zip(steps, steps[1:]) if key in a and key in b]
        out[f"engine/{phase}"] = _median(deltas) * 1e3
    if cpu is not None and len(times) > 1:
        rates = cpu.rates(times[0], times[-1])
        per_step = (times[-1] - times[0]) / (len(times) - 1)
        for role in (
            "trainer",
            "rollout",
            "driver",
            *[r for r in ROLES if r not in ("trainer", "rollout")],
        ):
            out[f"cpu/{role}"] = rates[role] * per_step * 1e3
        out["cpu/sum"] = sum(out[f"cpu/{r}"] for r in ("trainer", "rollout", "driver", "redis"))
        out["cpu/idle_cores"] = rates["idle"]
    return out


def format_timeline(name: str, t: dict[str, float]) -> str:
    """Three lines: the trainer's phases, the engine's, the CPU per process (ms per step)."""
    trainer = " ".join(f"{p} {t[f'trainer/{p}']:.1f}" for p in TRAINER_PHASES)
    engine = " ".join(f"{p} {t[f'engine/{p}']:.1f}" for p in ENGINE_PHASES)
    trainer_cpu = " ".join(f"{p} {t[f'trainer_cpu/{p}']:.1f}" for p in TRAINER_CPU)
    lines = [
        f"{name}: step {t['step']:.1f} ms (median)",
        f"  trainer (wall ms): {trainer}",
        f"  trainer thread (CPU ms): {trainer_cpu}",
        f"  rollout engine thread (wall ms): {engine}",
    ]
    if "cpu/sum" in t:
        cpu = " ".join(
            f"{r} {t[f'cpu/{r}']:.1f}" for r in ("trainer", "rollout", "driver", "redis")
        )
        lines.append(
            f"  CPU ms per step: {cpu}; sum {t['cpu/sum']:.1f} (/2 cores = "
            f"{t['cpu/sum'] / 2:.1f}; Ray's own processes not counted); machine idle cores "
            f"{t['cpu/idle_cores']:.2f}"
        )
    return "\n".join(lines)
