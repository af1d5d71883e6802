"""Entry point of `physarum run`: load the config and hand it to the job driver."""

from __future__ import annotations

import logging

from configs import load_job

log = logging.getLogger(__name__)


def run_job(config_path: str | None, overrides: list[str], resume_dir: str | None) -> int:
    """Validate the job and run it. Until the job loop lands this validates and reports."""
    job = load_job(config_path, overrides) if config_path else None
    if job is not None:
        import yaml

        print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), end="")
    print("physarum: the job loop is not built yet; the config above is valid.")
    return 0
