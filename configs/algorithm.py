"""Config sections for how the model learns: the algorithm, the rewards and the environment."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from configs.base import Section


class KLConfig(Section):
    coef: float = Field(0.0, ge=0)
    """0 disables the reference model entirely."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    mode: Literal["loss", "reward"] = "loss"
    """Add the KL as a loss term, or subtract coef * KL from the reward per token."""


class TISConfig(Section):
    enabled: bool = False
    """Truncated importance sampling between trainer and engine logprobs."""
    mode: Literal["truncate", "icepop"] = "truncate"
    """truncate: w = clamp(exp(old - rollout), low, high); icepop: w = 0 outside [low, high]."""
    low: float = Field(0.0, ge=0)
    high: float = Field(2.0, gt=0)
    max_token_lag: int | None = Field(None, ge=0)
    """Drop from the policy loss (weight 0, the loss's denominator unchanged) every generated
    token more than this many versions behind the trainer's: a per-token bound tighter than
    buffer.max_staleness, which judges a group by its oldest token. It reaches the older head
    of a partial rollout (rollout.partial_rollout) that the buffer still accepts. None: off.
    Applies whether or not `enabled`."""

    @model_validator(mode="after")
    def _bounds(self) -> TISConfig:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class MoEConfig(Section):
    bias_update_rate: float = Field(1e-3, ge=0)
    """u in loss-free balancing: bias_i += u * sign(mean_load - load_i) after each step."""
    aux_loss_coef: float = Field(0.0, ge=0)
    routing_replay: Literal["none", "trainer", "rollout"] = "none"
    """Which experts the trainer's MoE layers use. rollout (R3): the experts the rollout engine
    used for each generated token, in the logprob and training passes; trainer (R2): the
    experts of the trainer's own logprob pass, replayed in training; none: the router's own
    choice in every pass. true / false are read as trainer / none."""
    replay_prompt_routing: bool = False
    """With routing_replay rollout: also replay the engine's experts of the prompt tokens
    (they travel in the Episode too); by default the trainer routes the prompt itself."""

    @field_validator("routing_replay", mode="before")
    @classmethod
    def _bool_routing_replay(cls, value: object) -> object:
        if isinstance(value, bool):  # the earlier boolean form of this field
            return "trainer" if value else "none"
        return value


class RejectionSamplingConfig(Section):
    rounds: int = Field(1, ge=1)
    prompts_per_round: int = Field(512, ge=1)
    accept_min_reward: float = 1.0
    """A sample is accepted when its reward is at least this."""
    max_accepted_per_prompt: int = Field(1, ge=1)
    sft_epochs_per_round: int = Field(1, ge=1)


class OverlongConfig(Section):
    """DAPO's soft overlong punishment, added to each sample's reward (rewards/overlong.py):
    0 up to L_max - buffer_tokens generated tokens, then falling linearly to -penalty at L_max
    (= rollout.max_new_tokens), -penalty beyond."""

    buffer_tokens: int = Field(ge=1)
    """L_cache: the length of the punished interval before the limit."""
    penalty: float = Field(1.0, ge=0)
    """The penalty factor: the shaped reward reaches -penalty at the limit."""


class AlgorithmConfig(Section):
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] = "grpo"
    policy_loss: Literal["ppo_clip", "gspo", "sft"] = "ppo_clip"
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    eps_clip_low: float = Field(0.2, gt=0, lt=1)
    eps_clip_high: float = Field(0.28, gt=0)
    """DAPO clip-higher: the ratio is clipped to [1 - low, 1 + high]."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c (> 1) bounding the loss of negative-advantage tokens."""
    entropy_coef: float = 0.0
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    kl: KLConfig = Field(default_factory=KLConfig)
    tis: TISConfig = Field(default_factory=TISConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig)
    overlong: OverlongConfig | None = None
    """DAPO overlong reward shaping; null = off."""
    overlong_filter: bool = False
    """DAPO overlong filtering: samples cut by the length limit (finish reason 'length') are
    masked out of the loss (they still count in their group's advantage statistics)."""


class RewardPluginConfig(Section):
    name: str = Field(min_length=1)
    """A built-in name (exact, numeric, math, format, code, remote_rm, arithmetic, ...), an
    import path `pkg.module:function`, or an entry point of group physarum.rewards."""
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)


class RewardConfig(Section):
    plugins: list[RewardPluginConfig] = Field(default_factory=list)
    timeout_s: float = Field(10.0, gt=0)
    """Per-call timeout of a plugin; a timeout marks the episode as an error."""
    max_error_fraction: float = Field(0.5, ge=0, le=1)
    """A step whose episodes are errors (failed plugin, generation or environment) in a larger
    share than this stops the job (non-zero exit) instead of training on nothing."""


class EnvConfig(Section):
    name: str | None = None
    """Multi-turn environment (calculator, python, search, or an import path); null = single
    turn."""
    max_turns: int = Field(4, ge=1)
    max_total_tokens: int = Field(512, ge=8)
    step_timeout_s: float = Field(60.0, gt=0)
    """Per-call timeout of env.step; a sync step runs in its own thread and is abandoned when
    it times out, so a hung environment fails its episode, never the worker."""
    args: dict[str, Any] = Field(default_factory=dict)
    agent: str | None = None
    """An agent written with the OpenAI client, `async def run(client, task) -> float | dict`
    (import path pkg.module:function, built-in name or entry point of group physarum.agents),
    instead of `name`. Each episode's client calls this worker's engine; score it with reward
    plugins (`agent` passes its return value through)."""
    agent_timeout_s: float = Field(120.0, gt=0)
    """Per-episode limit of an agent run; a run past it becomes an error episode."""
    on_prefix_mismatch: Literal["split", "drop"] = "split"
    """An agent call whose prompt does not extend the previous prompt + answer token for token:
    split (each token-exact part is an episode) or drop (train on none of that run)."""

    @model_validator(mode="after")
    def _env_or_agent(self) -> EnvConfig:
        if self.name and self.agent:
            raise ValueError(
                f"env.name ({self.name!r}) and env.agent ({self.agent!r}): give one, an "
                "environment class or an OpenAI-client agent"
            )
        return self
