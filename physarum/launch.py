"""Entry point of `physarum run`: resolve the job (or the run dir to resume), pick the mode's
driver from a registry, run it inside a JobContext, print the summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from configs import JobConfig, load_job
from physarum.context import JobContext
from physarum.errors import UserError
from physarum.logs import report_service_error
from physarum.metrics import format_duration
from physarum.rundir import RunDir

log = logging.getLogger(__name__)

Driver = Callable[[JobContext], dict[str, float]]


def _drivers() -> dict[str, Driver]:
    from physarum.modes.evaluate import run_eval
    from physarum.modes.rejection_sampling import run_rejection_sampling
    from physarum.modes.rl import run_rl
    from physarum.modes.sft import run_sft

    return {
        "rl": run_rl,
        "sft": run_sft,
        "rejection_sampling": run_rejection_sampling,
        "eval": run_eval,
    }


def resolve(
    config_path: str | None, overrides: list[str], resume_dir: str | None
) -> tuple[JobConfig, bool]:
    if resume_dir:
        run = RunDir(Path(resume_dir))
        job = run.load_job()
        if overrides:
            raise UserError("--set cannot change a job being resumed; edit its job.yaml instead")
        if run.latest_checkpoint() is None:
            log.warning("%s has no complete checkpoint; starting from step 0", resume_dir)
        # the run dir is where it is now, whatever job.yaml says (it may have been moved)
        return job.model_copy(update={"run_dir": str(Path(resume_dir).absolute())}), True
    assert config_path is not None
    return load_job(config_path, overrides), False


def execute(
    job: JobConfig, *, resume: bool = False, stage: str | None = None, overwrite: bool = False
) -> dict[str, float]:
    """Run one job to the end and return its final metrics. A new job needs an empty run
    dir, or overwrite=True to clear the run dir that is there."""
    driver = _drivers()[job.mode]
    started = time.monotonic()
    try:
        with JobContext(job, resume=resume, stage=stage, overwrite=overwrite) as ctx:
            log.info("%s: %s job, run dir %s", job.name, job.mode, ctx.run.root)
            result = driver(ctx)
    except Exception as exc:  # an actor's error: say which service and where its log is
        report_service_error(exc, job.resolved_run_dir)
        raise
    result["wall_s"] = time.monotonic() - started
    return result


def run_job(
    config_path: str | None,
    overrides: list[str],
    resume_dir: str | None,
    dashboard: bool = True,
    overwrite: bool = False,
) -> int:
    job, resume = resolve(config_path, overrides, resume_dir)
    if not dashboard:  # --no-dashboard; also for --resume, which takes no --set
        job = job.model_copy(
            update={"logging": job.logging.model_copy(update={"dashboard": False})}
        )
    result = execute(job, resume=resume, overwrite=overwrite)
    summary = {k: round(v, 4) for k, v in result.items() if isinstance(v, int | float)}
    print(
        f"physarum: {job.name} finished in {format_duration(result['wall_s'])}: "
        f"{json.dumps(summary)}"
    )
    return 0
