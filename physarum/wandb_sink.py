"""W&B as one more metrics destination (`logging.wandb`), optional: `pip install
'physarum-rl[wandb]'`. Each `MetricsSink` (one job stage) is one W&B run; every record of
metrics.jsonl becomes one W&B history row, its numbers logged against the job's `step`.
"""

from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path
from typing import Any

import yaml

from configs.job import WandbConfig
from physarum.errors import UserError

log = logging.getLogger(__name__)


class WandbSink:
    def __init__(self, cfg: WandbConfig, run_dir: Path, stage: str) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UserError(
                "logging.wandb: the wandb package is not installed; "
                "pip install 'physarum-rl[wandb]' (or remove logging.wandb)"
            ) from exc
        job_yaml = run_dir / "job.yaml"
        config = yaml.safe_load(job_yaml.read_text()) if job_yaml.exists() else {}
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            dir=str(run_dir),  # the run's files go to run_dir/wandb/
            name=f"{run_dir.name}-{stage}",
            group=run_dir.name,  # the stages of one job (SFT, then RL) side by side
            job_type=stage,
            config=config,
            settings=wandb.Settings(console="off", silent=True, save_code=False),
        )
        # the job's step is the x axis: a step may log twice (a final eval after its last step)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        log.info("wandb: %s run %s (%s)", cfg.mode, self.run.id, self.run.dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = {  # numbers only, as TensorBoard gets them (numpy scalars too)
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, numbers.Real) and math.isfinite(value)
        }
        self.run.log({"step": step, **values})

    def close(self) -> None:
        self.run.finish()
