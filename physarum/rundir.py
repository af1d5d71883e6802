"""The layout of a run directory: one place that names every file a job writes.

runs/<name>/
  job.yaml            the resolved config (what --resume reads back)
  tokenizer/          the tokenizer every service loads
  data/train.jsonl    training rows (generated for toy tasks)
  data/eval.jsonl     held-out rows
  init/               the initial weights as a Hugging Face directory
  redis/              the private redis-server's data dir (AOF) and password (0600)
  placement.json      where every actor runs: role, rank, node, pid, device, GPUs
  checkpoints/step_N/ trainer checkpoints (model, optimizer, scheduler, RNG, step, version)
  hf/                 the final model as a Hugging Face directory (+ tokenizer)
  metrics.jsonl       one JSON object per step
  tb/                 TensorBoard events
  curves.png          reward and accuracy curves
  accepted/round_K.jsonl  rejection sampling: the accepted samples
  logs/               service logs (SGLang servers, the router)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from configs import JobConfig, load_job

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class RunDir:
    root: Path

    def create(self) -> RunDir:
        for sub in ("data", "checkpoints", "logs", "accepted"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self

    @property
    def job_yaml(self) -> Path:
        return self.root / "job.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def eval_data(self) -> Path:
        return self.root / "data" / "eval.jsonl"

    @property
    def init_model(self) -> Path:
        return self.root / "init"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def redis_password(self) -> Path:
        """The private redis-server's password (mode 0600)."""
        return self.root / "redis" / "password"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def accepted(self, round_index: int) -> Path:
        return self.root / "accepted" / f"round_{round_index}.jsonl"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The highest complete checkpoint (it has a COMPLETE marker), or None."""
        found = []
        if self.checkpoints.is_dir():
            for child in self.checkpoints.iterdir():
                match = _STEP_DIR.match(child.name)
                if match and (child / "COMPLETE").exists():
                    found.append((int(match.group(1)), child))
        return max(found) if found else None

    def save_job(self, job: JobConfig) -> None:
        self.job_yaml.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))

    def load_job(self) -> JobConfig:
        if not self.job_yaml.exists():
            raise FileNotFoundError(f"{self.root} is not a run dir: it has no job.yaml")
        return load_job(self.job_yaml)
