"""Chaos trials in CI: the toy RL job (10 steps, tiny model) under kill -9 of each of its
processes, at seeded points, then the invariants from its checkpoint and buffer.

Three trials keep the set short (each job start costs ~25 s of Ray and actor start-up):
 - a rollout worker killed twice in a row: the driver replaces it each time, the job ends 0;
 - the trainer, then (in the resumed job) the redis-server: each stops the job with a
   non-zero exit, and `physarum run --resume DIR` finishes it;
 - the driver: `--resume` stops the orphaned redis-server and finishes the job.
bench/chaos.py runs the long seeded campaign against an uninterrupted reference run.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.chaos.trial import STEPS, TrialPlan, run_trial

SEED = 18  # issue 18: picks each trial's kill step and delay
PACE_S = 0.1  # seconds per episode's reward: 16 episodes a step, so steps of ~0.4 s or more
_rng = random.Random(SEED)
PLANS = [
    TrialPlan(i, targets, _rng.randint(1, STEPS - 5), round(_rng.uniform(0, 1.0), 2))
    for i, targets in enumerate(
        [("rollout", "rollout"), ("trainer", "redis"), ("driver",)],
    )
]


@pytest.mark.timeout(1500)  # up to three job starts on a loaded machine
@pytest.mark.parametrize("plan", PLANS, ids=[p.name for p in PLANS])
def test_kill_then_recover_loses_nothing_and_trains_nothing_twice(
    plan: TrialPlan, tmp_path: Path
) -> None:
    # paced: on an idle machine the steps left after a resume took less than the planned
    # delay, so the job ended before its second kill (CI, 2026-12-06)
    result = run_trial(plan, tmp_path, job_timeout_s=400, pace_s=PACE_S)
    log = (tmp_path / f"trial_{plan.index}.log").read_text()[-4000:]
    assert not result.error, f"{result.error}\n{log}"
    assert len(result.kills) == len(plan.targets), log
    assert result.completed, f"exits {result.exits}\n{log}"
    assert result.report is not None and result.report.ok, result.report.summary()
    assert result.report.trained == STEPS * 4  # every step trained prompts_per_step groups
    assert result.leftovers == 0, "processes of the trial outlived its job"
    if plan.targets[0] == "rollout":
        assert result.outcome == "recovered" and result.exits == [0]
        return
    # stopped with a non-zero exit, then finished by --resume
    assert result.outcome == "resumed" and result.exits[-1] == 0
    runs = (tmp_path / f"trial_{plan.index}.log").read_text().split("=== physarum run")[1:]
    assert len(runs) == len(result.exits)
    for output, code in zip(runs[:-1], result.exits[:-1], strict=True):
        assert code != 0
        if code != -9:  # a job that saw its trainer or redis-server die says what to run
            resume = f"physarum run --resume {tmp_path / f'trial_{plan.index}'}"
            assert resume in output and "Traceback" not in output, output[-3000:]
