"""The whole job: mode, name, and one section per service, with cross-section checks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from configs.algorithm import AlgorithmConfig, EnvConfig, RewardConfig
from configs.base import Section
from configs.model_data import DataConfig, ModelConfig, TokenizerConfig
from configs.services import BufferConfig, ClusterConfig, RolloutConfig, TrainerConfig

Mode = Literal["sft", "rejection_sampling", "rl", "eval"]


class WandbConfig(Section):
    """Weights & Biases logging (`pip install 'physarum-rl[wandb]'`). Every metric the job
    writes to metrics.jsonl is logged at the same step."""

    project: str = Field(min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline: write the run under run_dir/wandb for a later `wandb sync`."""


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_every: int = Field(1, ge=1)
    """Print the progress line every this many steps."""
    jsonl: bool = True
    """Write metrics.jsonl in the run dir."""
    tensorboard: bool = True
    plot: bool = True
    """Write a PNG of the reward and accuracy curves at the end."""
    dashboard: bool = True
    """Serve the live dashboard and JSON API while the job runs (`physarum run --no-dashboard`
    turns it off). Its URL, with the access token, is printed at start and written to
    run_dir/dashboard.json (mode 0600)."""
    dashboard_port: int = Field(0, ge=0, le=65535)
    """0 picks a free port."""
    mismatch_top: int = Field(32, ge=0)
    """RL: after each step, the trainer writes the tokens with the largest |trainer - rollout|
    logprob to run_dir/mismatch/step_<N>.jsonl (read by `physarum inspect`); 0 = off."""
    dashboard_host: str = "127.0.0.1"
    """The address the dashboard binds; 0.0.0.0 serves every interface (still token-only)."""
    wandb: WandbConfig | None = None
    """Also log to W&B, e.g. {project: physarum, mode: offline}; off when absent."""


class CheckpointConfig(Section):
    interval: int = Field(0, ge=0)
    """Save every this many steps (episode groups are acknowledged only then); 0 = at the end."""
    keep_last: int = Field(2, ge=1)
    save_hf: bool = True
    """Also write a Hugging Face directory (config, safetensors, tokenizer) at the end."""
    timeout_s: float = Field(1800.0, gt=0)
    """A checkpoint, restore or final save that takes longer fails the job, naming the
    trainer ranks that did not answer (instead of a silent hang)."""


class JobConfig(Section):
    mode: Mode
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str | None = None
    """Where checkpoints, logs and metrics go; defaults to runs/<name>."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def resolved_run_dir(self) -> Path:
        """Absolute: a relative run_dir is taken from this process's cwd (the driver's, since
        the driver hands actors a job made absolute by `with_absolute_paths`)."""
        return (Path(self.run_dir) if self.run_dir else Path("runs") / self.name).absolute()

    def with_absolute_paths(self, base: Path) -> JobConfig:
        """A copy whose run dir and model/tokenizer/data paths are absolute, relative ones
        taken from `base`: actors on other nodes run in another cwd (that of `ray start`)."""

        def absolute(path: str | None) -> str | None:
            return None if path is None else str(base / Path(path).expanduser())

        run_dir = Path(self.run_dir) if self.run_dir else Path("runs") / self.name
        return self.model_copy(
            update={
                "run_dir": str(base / run_dir.expanduser()),
                "model": self.model.model_copy(update={"path": absolute(self.model.path)}),
                "tokenizer": self.tokenizer.model_copy(
                    update={"path": absolute(self.tokenizer.path)}
                ),
                "data": self.data.model_copy(
                    update={
                        "train_path": absolute(self.data.train_path),
                        "eval_path": absolute(self.data.eval_path),
                    }
                ),
            }
        )

    @property
    def buffer_namespace(self) -> str:
        return self.buffer.namespace or self.name

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        for check in (
            _check_rewards,
            _check_losses,
            _check_overlong,
            _check_ranks,
            _check_megatron,
            _check_routing_replay,
            _check_data,
            _check_early_stop,
        ):
            check(self)
        return self


def _check_rewards(job: JobConfig) -> None:
    if job.mode in ("rl", "rejection_sampling", "eval") and not job.reward.plugins:
        raise ValueError(
            f"reward.plugins: mode {job.mode!r} scores samples, so at least one reward plugin "
            "is needed (e.g. [{name: arithmetic}])"
        )


def _check_losses(job: JobConfig) -> None:
    algo = job.algorithm
    if job.mode == "rl" and algo.policy_loss == "sft":
        raise ValueError("algorithm.policy_loss: 'sft' is for mode sft/rejection_sampling, not rl")
    if algo.advantage == "gae" and job.mode == "rl" and algo.policy_loss == "gspo":
        raise ValueError(
            "algorithm.advantage: gae gives per-token advantages; gspo needs a "
            "sequence-level estimator (grpo, dr_grpo, rloo, reinforce_pp)"
        )
    if algo.advantage == "gae" and job.mode == "rl" and job.trainer.lora is not None:
        raise ValueError(
            "trainer.lora: algorithm.advantage 'gae' trains a critic (PPO value model) that "
            "has no LoRA adapters; use grpo, dr_grpo, rloo or reinforce_pp with LoRA"
        )
    needs_group = algo.advantage in ("grpo", "dr_grpo", "rloo")
    if job.mode == "rl" and needs_group and job.rollout.n_samples_per_prompt < 2:
        raise ValueError(
            f"rollout.n_samples_per_prompt: advantage {algo.advantage!r} compares samples of "
            f"one prompt, so it needs at least 2 (got {job.rollout.n_samples_per_prompt})"
        )


def _check_overlong(job: JobConfig) -> None:
    overlong, limit = job.algorithm.overlong, job.rollout.max_new_tokens
    if overlong is not None and overlong.buffer_tokens >= limit:
        raise ValueError(
            f"algorithm.overlong.buffer_tokens: {overlong.buffer_tokens} must be below "
            f"rollout.max_new_tokens = {limit} (L_max - L_cache is where the penalty starts)"
        )


def _check_ranks(job: JobConfig) -> None:
    if job.mode == "rl" and job.trainer.prompts_per_step < job.trainer.num_ranks:
        raise ValueError(
            f"trainer.prompts_per_step: {job.trainer.prompts_per_step} groups cannot be split "
            f"over trainer.num_ranks = {job.trainer.num_ranks} ranks (each needs at least one)"
        )


def _check_megatron(job: JobConfig) -> None:
    if job.trainer.backend != "megatron":
        return
    mc = job.trainer.megatron
    model_parallel = mc.tp * mc.pp * mc.cp
    if job.trainer.num_ranks % model_parallel:
        raise ValueError(
            f"trainer.num_ranks: {job.trainer.num_ranks} is not a multiple of "
            f"tp*pp*cp = {model_parallel} (tp={mc.tp}, pp={mc.pp}, cp={mc.cp})"
        )
    if job.trainer.num_ranks % mc.ep:
        raise ValueError(
            f"trainer.megatron.ep: {mc.ep} must divide trainer.num_ranks ({job.trainer.num_ranks})"
        )


def _check_routing_replay(job: JobConfig) -> None:
    """R3 needs an engine that reports its experts (both backends force them)."""
    if job.algorithm.moe.routing_replay != "rollout":
        return
    if job.rollout.engine == "sglang" and job.rollout.sglang.cpu:
        raise ValueError(
            "algorithm.moe.routing_replay: 'rollout' needs the engine's routed experts, and "
            "SGLang 0.5.23's CPU build cannot give them: it serves our MoE only with "
            "--model-impl transformers (rollout.sglang.cpu), whose MoE path "
            "(srt/models/transformers.py, _transformers_moe_forward) never reaches its "
            "routed-experts capturer (srt/layers/moe/topk.py, _capture_routed_experts), so "
            "return_routed_experts would carry no real experts. Use rollout.engine 'embedded', "
            "SGLang on GPUs (rollout.sglang.cpu: false), or routing_replay 'trainer'"
        )
    if job.env.agent:
        raise ValueError(
            "algorithm.moe.routing_replay: 'rollout' covers single- and multi-turn rollouts; "
            f"agent episodes (env.agent {job.env.agent!r}) are captured from OpenAI calls "
            "without the engine's experts, so the trainer would route them itself. Use "
            "routing_replay 'trainer' with env.agent"
        )


def _check_data(job: JobConfig) -> None:
    if job.data.train_path is None and job.data.task is None:
        raise ValueError("data: give data.train_path or a built-in data.task to generate from")


def _check_early_stop(job: JobConfig) -> None:
    ev = job.rollout.eval
    if ev.stop_at_accuracy is None:
        return
    if job.mode != "sft":
        raise ValueError(
            f"rollout.eval.stop_at_accuracy: early stopping is for mode sft, not {job.mode!r}"
        )
    if ev.interval == 0:
        raise ValueError(
            "rollout.eval.stop_at_accuracy: needs rollout.eval.interval > 0 (the evals it checks)"
        )
