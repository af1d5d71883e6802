"""The toy LoRA GRPO job end to end (embedded Ray, Redis, engine), tiny and short.

What a LoRA user relies on: the run dir holds adapter/ (PEFT format) and hf/ (the merged
model), checkpoints hold adapters and never the base, and only adapters changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import load_job
from models.checkpoint import from_pretrained
from physarum.launch import execute

TINY = [
    "model.preset=glm4moe-tiny",
    "data.n_train=200",
    "data.n_eval=16",
    "rollout.n_samples_per_prompt=4",
    "rollout.prompts_per_lease=4",
    "rollout.max_running=32",
    "rollout.eval.n_prompts=16",
    "rollout.eval.interval=2",
    "trainer.prompts_per_step=4",
    "trainer.steps=3",
    "checkpoint.interval=2",
    "cluster.num_cpus=2",
    # a random tiny model earns no reward (zero GRPO advantages): the entropy bonus is what
    # moves the adapters in three steps
    "algorithm.entropy_coef=0.05",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("lora_job")
    job = load_job(Path("configs/toy_grpo_lora.yaml"), [f"run_dir={run_dir}", *TINY])
    return run_dir, execute(job)


def test_lora_job_exports_adapter_and_merged_model(lora_run: tuple[Path, dict]) -> None:
    run_dir, result = lora_run
    assert result["steps"] == 3
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)
    init = dict(from_pretrained(run_dir / "init").hf_state_dict())
    merged = dict(from_pretrained(run_dir / "hf").hf_state_dict())
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed, "the merged model equals the base"
    frozen = [k for k in changed if not k.endswith("proj.weight")]
    assert frozen == []  # embeddings, norms, the router and its bias: the base, untouched


def test_lora_checkpoints_hold_adapters_only(lora_run: tuple[Path, dict]) -> None:
    run_dir, _ = lora_run
    states = sorted((run_dir / "checkpoints").glob("*/trainer_state.pt"))
    assert states
    state = torch.load(states[-1], weights_only=False)
    assert state["version"] >= 2
    assert state["model"] and all("_A" in k or "_B" in k for k in state["model"])
    base_bytes = sum(p.numel() * 4 for p in from_pretrained(run_dir / "init").parameters())
    adapter_bytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    assert adapter_bytes * 4 < base_bytes
