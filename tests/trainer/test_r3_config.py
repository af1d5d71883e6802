"""algorithm.moe.routing_replay: the three modes, the boolean form read as before, and the
jobs R3 cannot run refused at load with the reason (without starting SGLang)."""

from __future__ import annotations

from pathlib import Path

import pytest

import configs
from configs import ConfigError, load_job
from configs.algorithm import MoEConfig

TOY = Path(configs.__file__).parent / "toy_grpo.yaml"


def test_modes_and_the_boolean_form():
    assert MoEConfig().routing_replay == "none"
    assert MoEConfig(routing_replay=True).routing_replay == "trainer"
    assert MoEConfig(routing_replay=False).routing_replay == "none"
    job = load_job(TOY, ["algorithm.moe.routing_replay=rollout"])
    assert job.algorithm.moe.routing_replay == "rollout"
    assert job.algorithm.moe.replay_prompt_routing is False
    with pytest.raises(ConfigError, match="routing_replay"):
        load_job(TOY, ["algorithm.moe.routing_replay=engine"])


def test_sglang_with_rollout_routing_fails_at_load_naming_the_reason():
    with pytest.raises(ConfigError) as info:
        load_job(TOY, ["algorithm.moe.routing_replay=rollout", "rollout.engine=sglang"])
    message = str(info.value)
    assert "algorithm.moe.routing_replay" in message and "return_routed_experts" in message
    assert "--model-impl transformers" in message
    # R2 needs nothing from the engine: fine with SGLang; GPU servers (native MoE) can answer
    assert load_job(TOY, ["algorithm.moe.routing_replay=trainer", "rollout.engine=sglang"])
    gpu = [
        "algorithm.moe.routing_replay=rollout",
        "rollout.engine=sglang",
        "rollout.sglang.cpu=false",
    ]
    assert load_job(TOY, gpu).algorithm.moe.routing_replay == "rollout"


def test_megatron_takes_rollout_routing():  # tests/trainer/megatron: its R3 scenario
    job = load_job(TOY, ["algorithm.moe.routing_replay=rollout", "trainer.backend=megatron"])
    assert job.algorithm.moe.routing_replay == "rollout"


def test_multi_turn_takes_rollout_routing_and_agents_are_refused():
    job = load_job(TOY, ["algorithm.moe.routing_replay=rollout", "env.name=calculator"])
    assert job.env.name == "calculator"
    with pytest.raises(ConfigError, match="agent episodes"):
        load_job(TOY, ["algorithm.moe.routing_replay=rollout", "env.agent=my_agents:run"])
