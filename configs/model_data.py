"""Config sections for what the job starts from: the model, the tokenizer and the data."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from configs.base import Section

ModelPreset = Literal["glm4moe-toy", "glm4moe-tiny", "glm-4.6"]
DType = Literal["float32", "bfloat16"]


class ModelConfig(Section):
    preset: ModelPreset = "glm4moe-toy"
    """Architecture of a freshly initialised model; ignored when `path` is set."""
    path: str | None = None
    """A Hugging Face checkpoint directory (config.json + safetensors). Wins over `preset`."""
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict)
    """config.json keys to override on the preset (e.g. num_hidden_layers: 2)."""
    dtype: DType = "float32"
    """Parameter dtype in the trainer and the embedded engine (fp32 on a CPU is faster)."""
    init_seed: int = 0
    """Seed of the random initialisation of a fresh model."""


class TokenizerConfig(Section):
    path: str | None = None
    """A local Hugging Face tokenizer directory; null builds the toy tokenizer in the run dir."""
    vocab_size: int = Field(512, ge=64, le=65536)
    """Vocabulary size of the toy tokenizer (only used when `path` is null)."""


class DataConfig(Section):
    task: str | None = "arithmetic"
    """Task generating the data when no path is given, and naming the task for rewards: a
    built-in toy task (arithmetic, countdown, calculator), ``reasoning_gym:<dataset>`` (the
    `envs` extra), an entry point of group physarum.tasks or an import path to a TaskSpec."""
    task_args: dict[str, Any] = Field(default_factory=dict)
    """Parameters of the task generator, e.g. {digits: 2, ops: "+"}."""
    train_path: str | None = None
    """Training prompts/conversations: JSONL or Parquet rows {id, messages, label, task}."""
    eval_path: str | None = None
    """Held-out rows for eval; generated from `task`'s test split when null."""
    n_train: int = Field(10000, ge=1)
    """Rows generated for training when `train_path` is null."""
    n_eval: int = Field(200, ge=1)
    """Held-out rows used for eval."""
    seed: int = 0
    """Seed of generation and of the per-epoch shuffle."""
    shuffle: bool = True
    demonstrations: bool = False
    """SFT on the task's reference assistant turns (tool calls and observations included)
    instead of the bare label; used to warm-start agentic jobs."""
    demonstration_fraction: float = Field(1.0, gt=0, le=1)
    """With `demonstrations`: the share of generated train rows that get the demonstration,
    spread evenly; the others keep the bare label as a direct answer (e.g. 0.5 gives an agentic
    warm start that calls the tool about half of the time, for RL to improve on)."""
    on_bad_row: Literal["skip", "fail"] = "skip"
    """A malformed dataset row is skipped (and counted, with its line) or fails the job."""
    max_epochs: int | None = Field(None, ge=1)
    """Stop leasing prompts after this many passes over the data; null = unlimited."""
