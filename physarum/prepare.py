"""Everything a job needs on disk before any service starts, written into the run dir once.

The tokenizer (given, or the toy one built from the tasks' text), the training and held-out
rows (given files, or generated from the toy task), and the initial weights as a Hugging Face
directory (a given checkpoint, or a fresh model from the preset). Every service then loads
the same files, so every rank and worker starts identical. On resume all of it is reused.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from configs import JobConfig
from physarum.errors import UserError
from physarum.rundir import RunDir

if TYPE_CHECKING:
    from envs.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    tokenizer_dir: Path
    train_path: Path
    eval_path: Path
    model_dir: Path
    vocab_size: int


def prepare(job: JobConfig, run: RunDir) -> Prepared:
    tokenizer_dir = _tokenizer(job, run)
    train_path, eval_path = _data(job, run)
    check_rows(job, train_path, "data.train_path")
    from models.tokenizer import load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(tokenizer_dir)
    special = {
        "eos_token_id": list(stop_token_ids(tokenizer)),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    from physarum.model_checks import check_model_fits

    check_model_fits(job, len(tokenizer))  # before the driver allocates the initial model
    model_dir = _initial_model(job, run, len(tokenizer), special)
    return Prepared(tokenizer_dir, train_path, eval_path, model_dir, len(tokenizer))


def check_rows(job: JobConfig, path: Path, field: str) -> int:
    """Refuse a dataset with no usable row before any actor starts (an empty one used to wait
    120 s for prompts; an all-invalid one ran on until killed). Returns the usable rows."""
    from buffer.dataset import DatasetError, parse_dataset
    from envs.tasks import read_jsonl

    try:
        if job.mode in ("sft", "rejection_sampling"):  # read whole by the driver, strictly
            n, errors = len(read_jsonl(path)), []
        else:  # read by the buffer, bad rows skipped or fatal as data.on_bad_row says
            report = parse_dataset(path, on_bad_row=job.data.on_bad_row).report
            n, errors = report.n_loaded, report.errors
    except (DatasetError, ValueError) as exc:
        raise UserError(f"{field}: {exc}") from None
    if n == 0:
        why = f"; every row is invalid, e.g. {'; '.join(errors[:3])}" if errors else " (empty)"
        raise UserError(f"{field}: {path} has no usable row{why}")
    return n


def _tokenizer(job: JobConfig, run: RunDir) -> Path:
    if job.tokenizer.path:
        path = Path(job.tokenizer.path)
        if not path.is_dir():
            raise UserError(f"tokenizer.path: {path} is not a directory")
        return path
    if not (run.tokenizer / "tokenizer.json").exists():
        from envs.tasks import TASKS, tokenizer_corpus
        from models.tokenizer import build_toy_tokenizer

        corpus = tokenizer_corpus(seed=0)
        if job.data.task is not None and job.data.task not in TASKS:  # e.g. reasoning_gym:...
            corpus += _task_spec(job).corpus_lines(n=200, seed=0, **job.data.task_args)
        build_toy_tokenizer(run.tokenizer, corpus, vocab_size=job.tokenizer.vocab_size)
    return run.tokenizer


def _task_spec(job: JobConfig) -> TaskSpec:
    """The TaskSpec data.task names, resolved like any plugin; UserError naming the field."""
    from envs.tasks import get_task

    try:
        return get_task(job.data.task)
    except ValueError as exc:
        raise UserError(f"data.task: {exc}") from None


def _data(job: JobConfig, run: RunDir) -> tuple[Path, Path]:
    data = job.data
    train = _given(data.train_path, "data.train_path") or _generated(
        job, run.train_data, "train", data.n_train
    )
    evaluation = _given(data.eval_path, "data.eval_path") or _generated(
        job, run.eval_data, "test", data.n_eval
    )
    return train, evaluation


def _given(path: str | None, field: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"{field}: {path} does not exist")
    return Path(path)


def _generated(job: JobConfig, out: Path, split: str, n: int) -> Path:
    if out.exists():
        return out
    if job.data.task is None:
        raise UserError(f"data: no file for the {split} split and no data.task to generate it")
    from envs.tasks import write_jsonl

    spec = _task_spec(job)
    rows = spec.make_rows(n, seed=job.data.seed, split=split, **job.data.task_args)
    if job.data.demonstrations and split == "train":
        share = job.data.demonstration_fraction  # row i is a demonstration when the count
        rows = [  # floor(i * share) steps up at i: exactly floor(n * share), evenly spread
            {**row, "messages": spec.demonstration(row)}
            if int((i + 1) * share) > int(i * share)
            else row
            for i, row in enumerate(rows)
        ]
    write_jsonl(rows, out)
    log.info("generated %d %s rows (%s split) -> %s", len(rows), job.data.task, split, out)
    return out


def _initial_model(job: JobConfig, run: RunDir, vocab_size: int, special: dict) -> Path:
    if job.model.path:
        path = Path(job.model.path)
        if not (path / "config.json").exists():
            raise UserError(f"model.path: {path} has no config.json (not a HF checkpoint dir)")
        return path
    if (run.init_model / "config.json").exists():
        return run.init_model
    import torch

    from models import get_preset
    from models.checkpoint import save_pretrained
    from models.glm4moe import Glm4MoeForCausalLM

    config = get_preset(
        job.model.preset, **(special | {"vocab_size": vocab_size} | job.model.overrides)
    )
    torch.manual_seed(job.model.init_seed)
    model = Glm4MoeForCausalLM(config)
    save_pretrained(model, run.init_model)
    log.info("initialised a fresh %s model -> %s", job.model.preset, run.init_model)
    return run.init_model


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def export_final(model_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Make `out` a self-contained HF directory: the weights already there + tokenizer files.

    Only tokenizer files are copied: a tokenizer dir may itself be a model dir (a previous
    stage's output), and its weights must never overwrite the ones just saved.
    """
    if tokenizer_dir.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out / name)
    (out / "physarum.json").write_text(json.dumps({"initial_weights": str(model_dir)}))
    return out
