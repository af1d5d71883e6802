"""The layout of a run directory: one place that names every file a job writes.

runs/<name>/          mode 0700 (as every dir in it): it holds the buffer's password and data
  job.yaml            the resolved config (what --resume reads back)
  run.json            what the run was started as: {"mode", "name"} (a resume must match it)
  tokenizer/          the tokenizer every service loads
  data/train.jsonl    training rows (generated for toy tasks)
  data/eval.jsonl     held-out rows
  init/               the initial weights as a Hugging Face directory
  redis/              the private redis-server's data dir (AOF) and password (0600)
  secrets/            other per-job tokens (0600): the API key of the job's SGLang servers
  placement.json      where every actor runs: role, rank, node, pid, device, GPUs
  checkpoints/step_N/ trainer checkpoints (model, optimizer, scheduler, RNG, step, version,
                      MANIFEST.json checksums, buffer_state.json; trainer/checkpoint_record.py)
  checkpoints/corrupt_step_N/  a checkpoint that failed its checksums, set aside on resume
  hf/                 the final model as a Hugging Face directory (+ tokenizer)
  metrics.jsonl       one JSON object per step
  tb/                 TensorBoard events
  curves.png          reward and accuracy curves
  accepted/round_K.jsonl  rejection sampling: the accepted samples
  logs/               service logs: trainer-N.log, rollout-N.log, buffer.log (rotated), SGLang

A new run goes only into an empty (or missing) dir: `claim` refuses one that holds anything
unless told to overwrite it, and then clears it first, so two runs never mix.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from configs import JobConfig, load_job
from physarum.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_PRIVATE = 0o700


class RunDirInUseError(UserError):
    """A new run was pointed at a run dir that already holds something."""


class ResumeModeError(UserError):
    """A resumed job's mode differs from the mode its run dir was started with."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def create(self) -> RunDir:
        """Make the dir and its sub-dirs, all mode 0700 (also an existing dir's root)."""
        self.root.mkdir(mode=_PRIVATE, parents=True, exist_ok=True)
        self.root.chmod(_PRIVATE)
        for sub in ("data", "checkpoints", "logs", "accepted"):
            (self.root / sub).mkdir(mode=_PRIVATE, exist_ok=True)
        return self

    def claim(self, *, overwrite: bool) -> None:
        """Before a new run: refuse a dir that holds anything, or (overwrite) clear it. Only
        a run dir (one with a job.yaml) is cleared: anything else is not ours to delete."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise RunDirInUseError(f"run_dir {self.root} exists and is not a directory")
        present = sorted(p.name for p in self.root.iterdir())
        if not present:
            return
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        if not overwrite:
            raise RunDirInUseError(
                f"run_dir {self.root} is not empty ({shown}): a new run would mix with what is "
                f"there. Continue that run with `physarum run --resume {self.root}`, replace it "
                "with --overwrite (deletes everything in it), or choose another run_dir"
            )
        if not self.job_yaml.exists():
            raise RunDirInUseError(
                f"--overwrite: run_dir {self.root} is not empty ({shown}) and is not a run dir "
                "(no job.yaml), so it is not cleared; choose another run_dir"
            )
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def save_identity(self, job: JobConfig) -> None:
        """Record what this run was started as (a new run only)."""
        self.run_json.write_text(json.dumps({"mode": job.mode, "name": job.name}) + "\n")

    def check_resumable(self, job: JobConfig) -> None:
        """A resume must run the mode the run was started with (its checkpoints are that
        mode's); a run dir from before run.json existed is checked by job.yaml alone."""
        if not self.run_json.exists():
            return
        started = json.loads(self.run_json.read_text())
        if started.get("mode") != job.mode:
            raise ResumeModeError(
                f"{self.job_yaml}: mode is {job.mode!r} but this run was started as "
                f"{started.get('mode')!r} ({self.run_json}); its checkpoints belong to that "
                f"mode. Set mode back to {started.get('mode')!r} to resume, or start a new "
                f"{job.mode} run in another run_dir"
            )

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

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, dir) of every checkpoint with a COMPLETE marker, oldest first."""
        found = []
        if self.checkpoints.is_dir():
            for child in self.checkpoints.iterdir():
                match = _STEP_DIR.match(child.name)
                if match and (child / "COMPLETE").exists():
                    found.append((int(match.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The highest complete checkpoint (it has a COMPLETE marker), or None."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def secret(self, name: str) -> str:
        """A random token kept in secrets/<name> (mode 0600): made on first use, reused by a
        resume."""
        path = self.root / "secrets" / name
        if not path.exists():
            path.parent.mkdir(mode=_PRIVATE, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        path.chmod(0o600)
        return path.read_text().strip()

    def save_job(self, job: JobConfig) -> None:
        self.job_yaml.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))

    def load_job(self) -> JobConfig:
        if not self.job_yaml.exists():
            raise FileNotFoundError(f"{self.root} is not a run dir: it has no job.yaml")
        return load_job(self.job_yaml)
