"""The typed job config: one pydantic section per service, YAML presets, `load_job`."""

from configs.algorithm import (
    AlgorithmConfig,
    EnvConfig,
    KLConfig,
    MoEConfig,
    RejectionSamplingConfig,
    RewardConfig,
    RewardPluginConfig,
    TISConfig,
)
from configs.job import CheckpointConfig, JobConfig, LoggingConfig, Mode
from configs.loader import ConfigError, load_job, validate_job
from configs.model_data import DataConfig, ModelConfig, TokenizerConfig
from configs.services import (
    BufferConfig,
    ClusterConfig,
    EvalConfig,
    MegatronConfig,
    RolloutConfig,
    SGLangConfig,
    TrainerConfig,
)

__all__ = [
    "AlgorithmConfig",
    "BufferConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EnvConfig",
    "EvalConfig",
    "JobConfig",
    "KLConfig",
    "LoggingConfig",
    "MegatronConfig",
    "Mode",
    "ModelConfig",
    "MoEConfig",
    "RejectionSamplingConfig",
    "RewardConfig",
    "RewardPluginConfig",
    "RolloutConfig",
    "SGLangConfig",
    "TISConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "load_job",
    "validate_job",
]
