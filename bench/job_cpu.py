"""What a benchmarked RL job costs per step: the CPU each of its services used (sampled from
/proc while the job runs) and the medians of its trainer records (metrics.jsonl). Shared by
async_vs_sync.py and long_tail.py."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROLES = {"trainer": "ray::TrainerActor", "rollout": "ray::RolloutActor", "redis": "redis-server"}
"""Our service processes by their process title (the embedded Ray and Redis are children of
this process); "driver" is this process itself."""


class CpuSampler:
    """Samples, in a thread, the machine's idle CPU time (/proc/stat) and the CPU time of this
    job's processes (ROLES and this driver). Each run can then say how many cores stood idle
    while its steps ran (near 0 = saturated by other work: two services had no room to
    overlap) and how many CPU seconds each process spent per step (a cost the machine's load
    inflates far less than wall time)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, dict[str, float]]] = []  # (unix time, cumulative s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK")
        self._roles: dict[int, str] = {}

    def _idle_s(self) -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return (int(fields[4]) + int(fields[5])) / self._hz  # idle + iowait

    def _role_cpu(self) -> dict[str, float]:
        me = psutil.Process()
        totals = dict.fromkeys(ROLES, 0.0) | {"driver": sum(me.cpu_times()[:2])}
        for proc in me.children(recursive=True):
            try:
                role = self._roles.get(proc.pid)
                if role is None:
                    title = " ".join(proc.cmdline())
                    role = next((r for r, p in ROLES.items() if p in title), None)
                    if role is None:
                        continue
                    self._roles[proc.pid] = role
                times = proc.cpu_times()
            except psutil.Error:
                continue
            totals[role] += times.user + times.system
        return totals

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append((time.time(), {"idle": self._idle_s(), **self._role_cpu()}))

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rates(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per wall second of each counter between two unix times (nan when the
        window holds fewer than two samples): "idle" is then the mean idle cores."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return {key: float("nan") for key in ("idle", "driver", *ROLES)}
        (t0, first), (t1, last) = inside[0], inside[-1]
        return {key: (last[key] - first[key]) / (t1 - t0) for key in first}


class StepStats:
    """Medians over a job's measured trainer records (`records`, set by the subclass)."""

    records: list[dict[str, Any]]

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.records)

    @property
    def step_s(self) -> float:
        return self.median("perf/step_s")

    @property
    def wait_s(self) -> float:
        return self.median("perf/wait_s")

    @property
    def busy_s(self) -> float:
        return statistics.median(r["perf/step_s"] - r["perf/wait_s"] for r in self.records)
