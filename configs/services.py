"""Config sections for the three services (rollout, buffer, trainer) and the Ray cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configs.base import Section
from configs.model_data import DType


class SGLangConfig(Section):
    python: str | None = None
    """Interpreter of the SGLang environment; null = .venv-sglang/bin/python when present."""
    host: str | None = None
    """Address servers, the router and the weight-sync master bind; null = the node's IP as
    Ray sees it on a Ray cluster, 127.0.0.1 on an embedded Ray."""
    base_port: int = Field(30000, ge=0, le=65000)
    """Worker i listens on base_port + i; 0 picks free ports."""
    tp: int = Field(1, ge=1)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "bfloat16"
    mem_fraction_static: float | None = Field(None, gt=0, le=1)
    quantization: Literal["fp8"] | None = None
    """Serve a block-FP8 checkpoint (GPU only; the trainer then sends FP8 weights + scales)."""
    context_length: int | None = Field(None, ge=16)
    api_key: str | None = None
    cpu: bool = True
    """Add the flags that make SGLang serve on a CPU (--device cpu, torch_native attention,
    pytorch sampling, the transformers model implementation)."""
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout_s: float = Field(300.0, gt=0)
    router: bool = True
    """Put sglang-router in front of the workers."""
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    router_port: int = Field(0, ge=0, le=65000)
    """0 picks a free port."""
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    """How weights reach the servers: tensor = shared memory / CUDA IPC (same node),
    distributed = a gloo/NCCL group with the rollout worker as rank 0, disk = safetensors
    under the run dir (any node that shares it)."""
    weight_sync_backend: Literal["gloo", "nccl"] = "gloo"
    """Backend of the distributed path (nccl needs GPUs on both sides)."""
    max_total_tokens: int | None = Field(None, ge=64)
    """KV-cache tokens per server; null = rollout.max_running x rollout.max_context when cpu
    (SGLang would otherwise size the pool from free RAM), SGLang's own choice otherwise."""


class EvalConfig(Section):
    interval: int = Field(0, ge=0)
    """Evaluate every this many trainer steps; 0 = only at the start and the end."""
    n_prompts: int = Field(200, ge=1)
    k: int = Field(1, ge=1)
    """Samples per prompt: pass@k is reported (and pass@1 as the mean)."""
    temperature: float = Field(0.0, ge=0)
    """0 = greedy."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Defaults to rollout.max_new_tokens."""
    correct_min_reward: float = 1.0
    """A sample counts as correct when its reward reaches this."""
    stop_at_accuracy: float | None = Field(None, gt=0, le=1)
    """sft mode only: end training at the first eval (after step 0) whose accuracy reaches
    this; that evaluated model is the one saved. Needs eval.interval > 0."""


class RolloutConfig(Section):
    engine: Literal["embedded", "sglang"] = "embedded"
    num_workers: int = Field(1, ge=1)
    n_samples_per_prompt: int = Field(8, ge=1)
    """Samples per prompt: the group size for GRPO and k for rejection sampling."""
    prompts_per_lease: int = Field(4, ge=1)
    """Prompts a worker leases (and generates concurrently) at once."""
    over_sampling: float = Field(1.0, ge=1.0)
    """Lease this factor more prompts than needed so filtered groups do not starve training."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO's filter on zero reward std)."""
    max_ready_groups: int = Field(0, ge=0)
    """Lease no prompts while this worker has this many pushed groups the trainer has not
    taken yet (0: only buffer.max_staleness bounds how far it runs ahead). Within the same
    staleness bound, groups then wait less in the buffer (trained less stale) and more of
    the bound is spent generating (fuller decode batches). prompts_per_step / num_workers
    keeps one batch ready for the trainer."""
    max_new_tokens: int = Field(16, ge=1)
    max_context: int = Field(512, ge=8)
    """Prompt plus response tokens per sequence."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    max_running: int = Field(64, ge=1)
    """Sequences the embedded engine decodes at once (KV-cache slots)."""
    fp8: bool = False
    """Quantise linear weights blockwise to FP8 for rollout (FP8 trajectories)."""
    fp8_block: tuple[int, int] = (128, 128)
    lease_seconds: float = Field(120.0, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)
    """An engine that does not answer within this fails the job loudly."""
    mask_offpolicy_tokens: bool = False
    """Mask tokens whose version is older than the staleness bound (partial rollouts)."""
    partial_rollout: bool = True
    """Embedded engine: a weight update lands between two decode steps and generations in
    flight continue under the new weights (AReaL's interruptible generation; tokens keep
    their versions). False: the update waits until the running generations finish, admitting
    no new ones meanwhile (one version per sequence)."""
    fold_prefill_tokens: int = Field(0, ge=0)
    """Embedded engine: newly admitted sequences whose prefill (one row per distinct prompt)
    has at most this many tokens join the running sequences' decode forward, one row per
    prompt token, instead of a prefill forward of their own. Pays where a forward's fixed
    cost dominates (small models, short contexts: the toy presets); each folded row reads
    the batch's longest context, so keep it 0 (off) for long contexts."""
    threads: int = Field(1, ge=1)
    """torch threads per rollout worker."""
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _lengths(self) -> RolloutConfig:
        if self.max_new_tokens >= self.max_context:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below max_context "
                f"({self.max_context})"
            )
        return self


class BufferConfig(Section):
    url: str | None = None
    """redis:// or rediss:// URL (with password if any); null starts a private redis-server."""
    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]+$")
    """Key prefix; defaults to the job name."""
    capacity: int = Field(64, ge=1)
    """Unconsumed episode groups at which producers wait (backpressure)."""
    max_staleness: int = Field(1, ge=0)
    """Train on groups at most this many versions old; 0 = synchronous on-policy."""
    put_timeout_s: float = Field(600.0, gt=0)


class MegatronConfig(Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    expert_tp: int = Field(1, ge=1)
    """Tensor parallelism inside each expert (megatron's expert_tensor_parallel_size); slime
    runs GLM-4.5 with 1: whole experts per rank, spread by ep. Taken as tp when ep is 1."""
    cp: int = Field(1, ge=1)
    sequence_parallel: bool | None = None
    """null = on whenever tp > 1 (megatron requires it for MoE with TP)."""
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    distributed_optimizer: bool = True
    grouped_gemm: bool = False
    """Grouped expert GEMM (needs a GPU with TransformerEngine or grouped_gemm)."""
    transformer_engine: bool = False
    """Use the TransformerEngine layer spec (GPU)."""
    recompute: bool = False
    micro_batch_size: int = Field(1, ge=1)
    cpu_adam: bool = False


LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "shared_experts",
    "experts",
)
"""LoRA targets: attention projections, the dense MLP's projections (dense layers only), the
shared expert (its three projections) and the routed experts (one adapter pair per expert)."""


class LoraConfig(Section):
    """LoRA adapters on a frozen base (models/lora.py); torch backend only."""

    rank: int = 8
    """Adapter rank r (> 0)."""
    alpha: float = Field(16.0, gt=0)
    """Scaling s = alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input (not on routed experts: applied to dense targets only)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """A's init (PEFT's init_lora_weights True / "gaussian"); B starts at zero."""

    @model_validator(mode="after")
    def _targets(self) -> LoraConfig:
        if self.rank <= 0:
            raise ValueError(f"trainer.lora.rank: must be > 0, got {self.rank}")
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules:
            raise ValueError(
                f"trainer.lora.target_modules: unknown {unknown or 'empty list'}; "
                f"valid: {list(LORA_TARGETS)}"
            )
        return self


class TrainerConfig(Section):
    backend: Literal["torch", "megatron"] = "torch"
    num_ranks: int = Field(1, ge=1)
    """Trainer processes (data parallel for torch; TP x PP x DP for megatron)."""
    steps: int = Field(100, ge=1)
    """Optimizer steps (one weight version each)."""
    prompts_per_step: int = Field(8, ge=1)
    """Episode groups consumed per step in RL."""
    batch_size: int = Field(64, ge=1)
    """Sequences per step in SFT."""
    micro_batch_tokens: int = Field(4096, ge=16)
    """Token budget of one packed micro-batch."""
    ppo_epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    """Max global grad norm; 0 disables clipping."""
    dtype: DType = "float32"
    fsdp: bool = False
    threads: int = Field(1, ge=1)
    """torch threads per trainer rank."""
    critic_lr: float = Field(1e-4, gt=0)
    logprob_chunk: int = Field(1024, ge=16)
    """Positions per lm_head chunk when computing logprobs (never full-vocab logits at once)."""
    weight_bucket_mb: int = Field(512, ge=1)
    mtp_loss_weight: float = Field(0.0, ge=0)
    """SFT only: weight of the MTP layers' next-next-token loss (GLM's recipe; Megatron's
    mtp-loss-scaling-factor); 0 keeps them frozen. RL never trains them. Torch backend, no FSDP."""
    share_prompt_prefix: bool = False
    """RL, torch backend: compute each group's shared prompt once per micro-batch (the group's
    samples packed as one prompt tree: [prompt, completion 1, ..., completion k] with a tree
    attention mask; same loss, logprobs and gradients as unshared rows, fewer tokens through
    the model). Falls back to unshared rows automatically, with one log line, where it would
    not be exact: the megatron backend, a critic (advantage gae), algorithm.moe.aux_loss_coef
    > 0 (the balance loss is a mean over computed tokens), and routing_replay rollout with
    replay_prompt_routing. Groups whose prompts differ (some agent episodes) stay unshared."""
    megatron: MegatronConfig = Field(default_factory=MegatronConfig)
    lora: LoraConfig | None = None
    """LoRA adapters on a frozen base; null = full fine-tuning."""

    @model_validator(mode="after")
    def _lr(self) -> TrainerConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.lora is not None:
            _check_lora(self)
        return self


def _check_lora(cfg: TrainerConfig) -> None:
    if cfg.backend == "megatron":
        raise ValueError(
            "trainer.lora: LoRA is not supported by the megatron backend; use "
            "trainer.backend: torch or set trainer.lora: null"
        )
    if cfg.fsdp:
        raise ValueError("trainer.lora: LoRA is not supported with trainer.fsdp (set it false)")
    if cfg.mtp_loss_weight > 0:
        raise ValueError("trainer.lora: the MTP layers get no adapters; set mtp_loss_weight: 0")


class ClusterConfig(Section):
    address: str | None = None
    """Ray address; null = RAY_ADDRESS if set, otherwise an embedded Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of an embedded Ray; null = all."""
    trainer_cpus: float = Field(1.0, gt=0)
    rollout_cpus: float = Field(1.0, gt=0)
    trainer_gpus: float = Field(0.0, ge=0)
    rollout_gpus: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where trainer ranks and embedded engines compute: auto = cuda:<local index> in an
    actor that Ray gave GPUs (trainer_gpus / rollout_gpus > 0), the CPU otherwise; cuda
    fails at start when a process has no GPU."""
    rollout_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How the rollout workers' bundles spread over nodes (trainer ranks of one TP group are
    always STRICT_PACK: one node)."""
    trainer_resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources added to each trainer rank's bundle, e.g. {trainer_node: 1} with
    `ray start --resources '{"trainer_node": 8}'` on the trainer nodes."""
    rollout_resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources added to each rollout worker's bundle."""
    buffer_resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources of the buffer's bundle (the node that runs redis-server when the
    job is on a Ray cluster)."""
    rendezvous_timeout_s: float = Field(120.0, gt=0)
    """Trainer ranks that have not all joined torch.distributed within this fail the job,
    naming the missing rank and its node."""
    namespace: str = "physarum"

    @model_validator(mode="after")
    def _resources(self) -> ClusterConfig:
        for role in ("trainer", "rollout", "buffer"):
            for name, amount in getattr(self, f"{role}_resources").items():
                if name in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(
                        f"cluster.{role}_resources: {name!r} is set by cluster.{role}_cpus / "
                        "_gpus; list only custom resources here"
                    )
                if amount <= 0:
                    raise ValueError(f"cluster.{role}_resources.{name}: must be > 0, got {amount}")
        return self
