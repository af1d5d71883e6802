"""A rollout worker's parts, assembled from the job config: engine, tokenizer, rewards, env.

`RolloutWorkerCore` turns a dataset row into a scored group of Episodes (single turn, or a
multi-turn episode per sample when the job names an environment), runs the production loop
(`rollout.producer`) and held-out eval (`rollout.evaluate`), and applies weight updates.
Engines come from a registry keyed by `rollout.engine`. Nothing here knows about Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from buffer.episode import Episode
from configs import JobConfig
from models.chat import prompt_ids
from models.tokenizer import load_tokenizer, stop_token_ids
from rewards.composite import build_reward_fn
from rewards.overlong import shaped_scoring
from rollout.evaluate import evaluate_rows
from rollout.producer import ProducerPlan, RolloutProducer, sampling_from_config
from rollout.single_turn import generate_group, row_metadata
from rollout.types import Engine, SamplingParams

log = logging.getLogger(__name__)


def _embedded_engine(
    job: JobConfig, model_dir: Path, tokenizer: Any, tokenizer_dir: Path, name: str
) -> Engine:
    import torch

    from models.checkpoint import from_pretrained
    from models.device import resolve_device
    from rollout.embedded.engine import EmbeddedEngine

    torch.set_num_threads(job.rollout.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.model.dtype]
    # auto: the GPU Ray gave this worker (CUDA_VISIBLE_DEVICES), the CPU otherwise; the KV
    # cache and the sampling tensors follow the model onto it
    device = resolve_device(job.cluster.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = from_pretrained(model_dir, dtype=dtype, device=device)
    if job.rollout.fp8 and job.trainer.lora is not None:  # before the engine quantizes it
        from models.lora_merge import keep_exact_base

        keep_exact_base(model, job.trainer.lora)
    return EmbeddedEngine(
        model,
        tokenizer=tokenizer,
        max_running=job.rollout.max_running,
        context_len=job.rollout.max_context,
        fp8=job.rollout.fp8,
        seed=job.seed,
        name=name,
        partial_rollout=job.rollout.partial_rollout,
        fold_prefill_tokens=job.rollout.fold_prefill_tokens,
    )


def _sglang_engine(
    job: JobConfig, model_dir: Path, tokenizer: Any, tokenizer_dir: Path, name: str
) -> Engine:
    from rollout.sglang.engine import launch_sglang_engine

    if not job.rollout.partial_rollout:
        raise ValueError(
            "rollout.partial_rollout: false (updates wait for running generations) is "
            "implemented by the embedded engine only; rollout.engine is 'sglang'"
        )
    if job.rollout.fold_prefill_tokens:
        raise ValueError(
            f"rollout.fold_prefill_tokens: {job.rollout.fold_prefill_tokens} (prefills folded "
            "into the decode step) is implemented by the embedded engine only; rollout.engine "
            "is 'sglang': set it to 0"
        )
    return launch_sglang_engine(job, model_dir, name=name, tokenizer_dir=tokenizer_dir)


ENGINES: dict[str, Callable[[JobConfig, Path, Any, Path, str], Engine]] = {
    "embedded": _embedded_engine,
    "sglang": _sglang_engine,
}


# engine stats that are current sizes, not counters (left out of the metrics)
_GAUGES = frozenset({"num_running", "num_waiting", "num_free_slots"})


def spans_versions(episode: Episode) -> bool:
    """Whether the policy generated the episode's tokens under two or more weight versions
    (a partial rollout continued across an update)."""
    generated = episode.versions[episode.loss_mask.astype(bool)]
    return bool(generated.size) and bool(generated.min() != generated.max())


def row_seed(seed: int, row: dict[str, Any]) -> int:
    """A reproducible sampling seed of its own for each eval row. The engine draws sample j's
    uniforms from (seed, token position) only, so one seed shared by every row would give
    every prompt the same draws and make sampled evals (temperature > 0) all-or-nothing."""
    key = row.get("id") or json.dumps(row.get("messages"), sort_keys=True)
    return (seed * 1_000_003 + zlib.crc32(str(key).encode())) % (1 << 62)


class RolloutWorkerCore:
    """Everything one rollout worker needs, built once at start-up."""

    def __init__(
        self,
        job: JobConfig,
        *,
        model_dir: Path,
        tokenizer_dir: Path,
        worker_id: str,
        store: Any = None,
    ) -> None:
        self.job = job
        self.worker_id = worker_id
        self.store = store
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.stop_ids = list(stop_token_ids(self.tokenizer))
        self.reward_fn = build_reward_fn(job.reward.plugins, job.reward.timeout_s)
        self.env_factory = self._env_factory()
        agent = self._agent()  # resolved and checked before the engine loads
        self.engine = ENGINES[job.rollout.engine](
            job, model_dir, self.tokenizer, tokenizer_dir, worker_id
        )
        self.sampling = sampling_from_config(job.rollout, self.stop_ids)
        self.producer: RolloutProducer | None = None
        self.multi_version_episodes = 0  # training episodes generated across a weight update
        self.agent_runner = self._agent_runner(agent) if agent is not None else None

    def _env_factory(self) -> Callable[[], Any] | None:
        if not self.job.env.name:
            return None
        from envs.registry import resolve_env

        return resolve_env(self.job.env.name, self.job.env.args)

    def _agent(self) -> Any:
        """env.agent resolved and checked (envs.agent), or None."""
        env = self.job.env
        if not env.agent:
            return None
        from envs.agent import resolve_agent

        agent = resolve_agent(env.agent)
        if self.job.rollout.engine != "embedded":
            raise ValueError(
                f"env.agent: agent episodes are captured from the embedded engine; "
                f"rollout.engine is {self.job.rollout.engine!r}"
            )
        try:
            import openai  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                "env.agent: needs the openai package: pip install 'physarum-rl[agents]'"
            ) from exc
        return agent

    def _agent_runner(self, agent: Any) -> Any:
        """Agent episodes on this engine, served to the agents on a loopback port."""
        from rollout.agent_rollout import AgentRunner
        from rollout.agent_server import AgentServer

        env = self.job.env
        return AgentRunner(
            agent,
            AgentServer(self.engine).start(),
            self.tokenizer,
            timeout_s=env.agent_timeout_s,
            on_prefix_mismatch=env.on_prefix_mismatch,
            max_concurrent=self.job.rollout.max_running,
        )

    def stats(self) -> dict[str, float]:
        """The producer's counters, and the agent runs' when env.agent is set."""
        out = self.producer.stats.snapshot() if self.producer else {}
        if self.producer is not None:
            out["rollout/multi_version_episodes"] = float(self.multi_version_episodes)
        if self.agent_runner is not None:
            out.update(self.agent_runner.stats.snapshot())
        engine_stats = getattr(self.engine, "stats", None)
        if callable(engine_stats):  # the embedded engine's forwards: prefill vs decode calls
            counters = engine_stats()
            for key, value in counters.items():
                if key.startswith(("num_", "decode_batch_le_", "time_")) and key not in _GAUGES:
                    out[f"rollout/engine_{key}"] = float(value)
        return out

    async def generate_for_row(
        self, row: dict[str, Any], sampling: SamplingParams, n: int, *, routing: bool = False
    ) -> list[Episode]:
        """n samples of one row as Episodes (not yet scored); `routing`: with R3 on
        (algorithm.moe.routing_replay rollout), they carry the engine's experts."""
        if self.agent_runner is not None:
            return await self._agent_group(row, sampling, n)
        if self.env_factory is None:
            ids = prompt_ids(self.tokenizer, row["messages"], row.get("tools"))
            moe = self.job.algorithm.moe
            start = None
            if routing and moe.routing_replay == "rollout":
                start = 0 if moe.replay_prompt_routing else len(ids)
            return await generate_group(
                self.engine,
                ids,
                sampling,
                n,
                metadata=row_metadata(row),
                tokenizer=self.tokenizer,
                routed_experts_from=start,
            )
        from rollout.multiturn import run_episode

        r3 = routing and self.job.algorithm.moe.routing_replay == "rollout"
        mode = (
            ("all" if self.job.algorithm.moe.replay_prompt_routing else "response") if r3 else None
        )

        async def one(index: int) -> Episode:
            seed = None if sampling.sampling_seed is None else sampling.sampling_seed + index
            episode = await run_episode(
                self.engine,
                self.tokenizer,
                self.env_factory(),
                row,
                replace(sampling, sampling_seed=seed),
                max_turns=self.job.env.max_turns,
                max_total_tokens=self.job.env.max_total_tokens,
                step_timeout_s=self.job.env.step_timeout_s,
                routing=mode,
            )
            episode.metadata["sample_index"] = index
            return episode

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    async def _agent_group(
        self, row: dict[str, Any], sampling: SamplingParams, n: int
    ) -> list[Episode]:
        """n agent runs on `row` (seeds + index when seeded); a split run adds episodes."""

        async def one(index: int) -> list[Episode]:
            seed = None if sampling.sampling_seed is None else sampling.sampling_seed + index
            episodes = await self.agent_runner.run(row, replace(sampling, sampling_seed=seed))
            for episode in episodes:
                episode.metadata["sample_index"] = index
            return episodes

        runs = await asyncio.gather(*(one(i) for i in range(n)))
        return [episode for run in runs for episode in run]

    def make_producer(self, share: int) -> RolloutProducer:
        rollout = self.job.rollout
        plan = ProducerPlan(
            share=share,
            max_staleness=self.job.buffer.max_staleness,
            prompts_per_lease=rollout.prompts_per_lease,
            over_sampling=rollout.over_sampling,
            dynamic_sampling=rollout.dynamic_sampling,
            groups_per_step=self.job.trainer.prompts_per_step,
            max_ready=rollout.max_ready_groups,
        )
        n = rollout.n_samples_per_prompt

        async def generate(row: dict[str, Any]) -> list[Episode]:
            episodes = await self.generate_for_row(row, self.sampling, n, routing=True)
            self.multi_version_episodes += sum(spans_versions(e) for e in episodes)
            return episodes

        self.producer = RolloutProducer(
            worker_id=self.worker_id,
            engine=self.engine,
            store=self.store,
            generate_group=generate,
            score_group=self._training_scorer(),
            plan=plan,
        )
        return self.producer

    def _training_scorer(self) -> Callable[[Sequence[Episode]], Awaitable[None]]:
        """The reward function, plus DAPO's overlong term when algorithm.overlong is set
        (training samples only: evaluation scores the plain reward)."""
        overlong = self.job.algorithm.overlong
        if overlong is None:
            return self.reward_fn.score_group
        return shaped_scoring(
            self.reward_fn.score_group,
            self.job.rollout.max_new_tokens,
            overlong.buffer_tokens,
            overlong.penalty,
        )

    async def evaluate(
        self, rows: list[dict[str, Any]], *, k: int | None = None, temperature: float | None = None
    ) -> dict[str, float]:
        cfg = self.job.rollout.eval
        k = k or cfg.k
        temperature = cfg.temperature if temperature is None else temperature
        sampling = sampling_from_config(
            self.job.rollout,
            self.stop_ids,
            seed=self.job.seed,
            temperature=temperature,
            max_new_tokens=cfg.max_new_tokens,
        )

        async def generate(row: dict[str, Any]) -> list[Episode]:
            seeded = replace(sampling, sampling_seed=row_seed(self.job.seed, row))
            return await self.generate_for_row(row, seeded, k)

        return await evaluate_rows(
            rows,
            generate,
            self.reward_fn.score_group,
            k=k,
            correct_min_reward=cfg.correct_min_reward,
            concurrency=self.job.rollout.max_running,
        )

    async def update_weights(self, update: Any) -> int:
        """Apply a WeightUpdate between decode steps; returns the new version."""
        await self.engine.update_weights(update)
        if self.producer is not None:
            self.producer.set_weight_version(update.version)
        return int(update.version)

    def shutdown(self) -> None:
        if self.agent_runner is not None:
            self.agent_runner.server.stop()
        stop = getattr(self.engine, "shutdown", None)
        if callable(stop):
            stop()
        self.reward_fn.close()
