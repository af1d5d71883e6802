"""`physarum plan CONFIG`: the per-GPU memory of a megatron job's parallel plan."""

from __future__ import annotations

import json
from pathlib import Path

from configs import load_job
from physarum.errors import UserError


def print_plan(config_path: str, overrides: list[str]) -> int:
    from models import get_preset
    from trainer.megatron.arch import GlmArch
    from trainer.megatron.memory_plan import PlanInputs, render

    job = load_job(config_path, overrides)
    if job.trainer.backend != "megatron":
        raise UserError(f"trainer.backend: plan needs 'megatron', got {job.trainer.backend!r}")
    config_json = Path(job.model.path or "") / "config.json"
    if job.model.path and config_json.exists():
        hf = json.loads(config_json.read_text())
        source = str(config_json)
    else:
        hf = get_preset(job.model.preset, **job.model.overrides).to_hf_dict()
        source = f"preset {job.model.preset}"
    from physarum.model_checks import ModelFitError, parallel_problems

    if problems := parallel_problems(job, hf):
        raise ModelFitError(f"the parallel plan does not fit {source}: " + "; ".join(problems))
    arch = GlmArch.from_hf(hf)
    inputs = PlanInputs(
        par=job.trainer.megatron,
        world_size=job.trainer.num_ranks,
        dtype=job.model.dtype,
        micro_batch_tokens=job.trainer.micro_batch_tokens,
    )
    print(f"{job.name}: architecture from {source}; {job.trainer.num_ranks} GPUs")
    print(render(arch, inputs))
    return 0
