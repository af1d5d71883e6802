"""Checks of a job against its model's architecture, run before anything is allocated.

Configs cannot see the model (configs import nothing of ours), so what depends on it is
checked here, by `physarum config validate`, `physarum plan` and at job start (prepare):

* divisibility: trainer megatron TP against attention heads and KV heads, PP against layers,
  EP against routed experts, data-parallel ranks against the batch; SGLang TP likewise;
* memory: on the CPU (an embedded Ray, device cpu) the estimate of `physarum plan`
  (`trainer.megatron.memory_plan`: weights, grads, optimizer, activations per rank) plus one
  weight copy per rollout engine and one for the driver's initial model must fit in the
  host's available memory; the GLM-4.6 preset on a laptop used to die after 26 s in the
  allocator instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from configs import JobConfig
from physarum.errors import UserError

GIB = 1024**3
log = logging.getLogger(__name__)


class ModelFitError(UserError):
    """The job's parallel plan or memory does not fit its model; the message has the numbers."""


def model_hf_config(job: JobConfig, vocab_size: int | None = None) -> tuple[dict[str, Any], str]:
    """(HF config dict, where it came from): model.path's config.json, or the preset when
    there is none here (as `physarum plan` does; prepare refuses a missing model.path)."""
    config_json = Path(job.model.path or "") / "config.json"
    if job.model.path and config_json.is_file():
        try:
            return json.loads(config_json.read_text()), str(config_json)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"model.path: {config_json} is not readable JSON ({exc})") from None
    from models import get_preset

    overrides = dict(job.model.overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    try:
        return get_preset(job.model.preset, **overrides).to_hf_dict(), f"preset {job.model.preset}"
    except ValueError as exc:
        raise UserError(f"model.preset: {exc}") from None


def parallel_problems(job: JobConfig, hf: dict[str, Any]) -> list[str]:
    """What in the job's parallel sizes does not divide the model (one line each)."""
    heads = int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    layers, experts = int(hf["num_hidden_layers"]), int(hf.get("n_routed_experts") or 0)
    problems: list[str] = []

    def divides(size: int, field: str, total: int, what: str) -> None:
        if size > 1 and total % size:
            problems.append(f"{field}: {size} does not divide the model's {what} ({total})")

    trainer = job.trainer
    if trainer.backend == "megatron":
        mc = trainer.megatron
        divides(mc.tp, "trainer.megatron.tp", heads, "num_attention_heads")
        divides(mc.tp, "trainer.megatron.tp", kv_heads, "num_key_value_heads")
        divides(mc.pp, "trainer.megatron.pp", layers, "num_hidden_layers")
        divides(mc.ep, "trainer.megatron.ep", experts, "n_routed_experts")
        dp = trainer.num_ranks // (mc.tp * mc.pp * mc.cp) or 1
    else:
        dp = trainer.num_ranks
    if job.rollout.engine == "sglang":
        divides(job.rollout.sglang.tp, "rollout.sglang.tp", heads, "num_attention_heads")
        divides(job.rollout.sglang.tp, "rollout.sglang.tp", kv_heads, "num_key_value_heads")
    if job.mode in ("sft", "rejection_sampling") and trainer.batch_size % dp:
        problems.append(
            f"trainer.batch_size: {trainer.batch_size} sequences cannot be split evenly over "
            f"{dp} data-parallel rank(s); use a multiple of {dp}"
        )
    return problems


def memory_estimate(job: JobConfig, hf: dict[str, Any]) -> dict[str, float]:
    """Bytes the job needs on one host when everything runs there (the CPU case).

    trainer_rank: physarum plan's per-rank total (weights, grads, optimizer, activations);
    trainers: that times trainer.num_ranks; engines: a weight copy per rollout engine
    (float32 on the CPU); driver: the initial model the driver builds once.
    """
    from configs.services import MegatronConfig
    from trainer.megatron.arch import GlmArch
    from trainer.megatron.memory_plan import PlanInputs, memory_plan

    arch = GlmArch.from_hf(hf)
    trainer = job.trainer
    if trainer.backend == "megatron":
        par = trainer.megatron
    else:  # torch: whole model per rank; FSDP shards the optimizer state like megatron's
        par = MegatronConfig(distributed_optimizer=trainer.fsdp)
    plan = PlanInputs(
        par=par,
        world_size=trainer.num_ranks,
        dtype=trainer.dtype,
        micro_batch_tokens=trainer.micro_batch_tokens,
        num_microbatches=1,
    )
    stages = memory_plan(arch, plan)
    per_rank = max(s.total for s in stages)
    params = sum(s.params for s in stages)
    engines = job.rollout.num_workers if job.rollout.engine == "embedded" else 0
    return {
        "trainer_rank": float(per_rank),
        "trainers": float(per_rank * trainer.num_ranks),
        "engines": float(params * 4 * engines),
        "driver": float(params * 4),
        "params": float(params),
    }


def runs_on_this_host_cpu(job: JobConfig) -> bool:
    """True when every service computes on this machine's CPU (embedded Ray, no GPUs)."""
    cluster = job.cluster
    embedded = cluster.address is None and not os.environ.get("RAY_ADDRESS")
    no_gpu = cluster.trainer_gpus == 0 and cluster.rollout_gpus == 0
    return embedded and (cluster.device == "cpu" or no_gpu)


def available_host_bytes() -> float | None:
    """MemAvailable of /proc/meminfo, None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_model_fits(
    job: JobConfig, vocab_size: int | None = None, *, available: float | None = None
) -> None:
    """ModelFitError listing every divisibility problem, or the memory estimate against the
    host's available memory when the job runs on this CPU. `available` overrides the host's
    figure (tests)."""
    hf, source = model_hf_config(job, vocab_size)
    try:
        problems = parallel_problems(job, hf)
    except (KeyError, TypeError, ValueError) as exc:  # not a GLM-style config: nothing to check
        log.warning("model checks skipped: %s has no usable %s", source, exc)
        return
    if problems:
        raise ModelFitError(f"the parallel plan does not fit {source}: " + "; ".join(problems))
    if not runs_on_this_host_cpu(job):
        return  # GPUs: `physarum plan` prints the per-GPU verdict; the node's size is not known
    available = available_host_bytes() if available is None else available
    if available is None:
        return
    try:
        est = memory_estimate(job, hf)
    except (KeyError, TypeError, ValueError) as exc:  # ArchError is a ValueError
        log.warning("memory check skipped: cannot size %s (%s)", source, exc)
        return
    need = est["trainers"] + est["engines"] + est["driver"]
    if need > available:
        raise ModelFitError(
            f"{source} ({est['params'] / 1e9:.2f}B parameters) does not fit this machine: the "
            f"job needs about {need / GIB:.1f} GiB (trainer {job.trainer.num_ranks} x "
            f"{est['trainer_rank'] / GIB:.1f} GiB as `physarum plan` counts weights, grads, "
            f"optimizer and activations; {job.rollout.num_workers} engine weight copies "
            f"{est['engines'] / GIB:.1f} GiB; the driver's initial model "
            f"{est['driver'] / GIB:.1f} GiB) but {available / GIB:.1f} GiB is available. Use a "
            "smaller model.preset (glm4moe-toy, glm4moe-tiny) or a GPU cluster."
        )
