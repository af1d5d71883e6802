"""The trainer service's per-phase CPU metrics (perf/cpu_*): present, non-negative, within
the thread's CPU of the call, and the export's CPU reported with the step after it."""

from __future__ import annotations

import time
from pathlib import Path

from tests.trainer.test_trained_log import _group, _service, redis_url  # noqa: F401 (fixture)

PHASES = ("take", "build", "train", "after_train")


def test_rl_step_reports_the_cpu_of_each_phase(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    trainer, store = _service(tmp_path, redis_url)
    store.put_groups([_group("a", 0, 1), _group("b", 0, 2)])
    before = time.thread_time()
    first = trainer.rl_step(timeout_s=30)
    spent = time.thread_time() - before
    parts = [first[f"perf/cpu_{p}_s"] for p in PHASES]
    assert all(part >= 0.0 for part in parts)
    assert first["perf/cpu_train_s"] > 0.0
    assert sum(parts) <= spent  # phases of this thread's own CPU, nothing counted twice
    assert first["perf/cpu_export_s"] == 0.0  # no export before the first step

    trainer.weight_update()
    store.put_groups([_group("c", 0, 3), _group("d", 0, 4)])
    second = trainer.rl_step(timeout_s=30)
    assert second["perf/cpu_export_s"] > 0.0
    store.close()
