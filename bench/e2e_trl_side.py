"""TRL's half of bench/e2e_vs_trl.py: GRPOTrainer with the benchmark's settings, timed.

`grpo_args` is the one place TRL's settings live (bench/e2e_loss_parity.py builds the same
trainer to compare one step's loss and gradient with ours); `run_trl` trains and times it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import Fixture, RunResult  # bench/common.py: the script's directory is on sys.path

from envs.tasks import read_jsonl
from models.chat import prompt_ids
from models.tokenizer import load_tokenizer
from rewards.builtins.toy_tasks import arithmetic_score

PROMPTS, SAMPLES, MAX_NEW, TEMPERATURE, LR, CLIP_LOW, CLIP_HIGH = 8, 8, 8, 1.0, 1e-4, 0.2, 0.28


def trl_reward(completions: list[Any], label: list[str], **_: Any) -> list[float]:
    """The `arithmetic` reward in TRL's signature: completions (conversational) -> floats."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [arithmetic_score(text, str(lab)) for text, lab in zip(texts, label, strict=True)]


trl_reward.__name__ = "arithmetic"


def require_trl(script: str) -> None:
    """Exit with the install command when the `bench` extra (TRL and its pins) is missing:
    `make setup` leaves it out, since only the TRL benchmarks need it."""
    missing = [m for m in ("trl", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"{script}: needs the `bench` extra ({', '.join(missing)} not installed in "
            f"{sys.prefix}); install it with `make bench-env` (trl, datasets, accelerate, "
            "py-spy with torch pinned at 2.13.0), or run with --no-trl"
        )


def check_same_prompts(tok: Any, rows: list[dict]) -> None:
    """TRL tokenises prompts with apply_chat_template; ours with models.chat.prompt_ids."""
    for row in rows[:16]:
        trl_ids = tok.apply_chat_template(
            [row["messages"]], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        if list(trl_ids) != prompt_ids(tok, row["messages"]):
            raise RuntimeError(f"row {row['id']}: TRL and Physarum tokenise the prompt differently")


def grpo_args(out: Path, *, steps: int, seed: int) -> Any:
    """GRPOConfig of the benchmark (the settings bench/README.md's e2e section lists)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=PROMPTS * SAMPLES,
        gradient_accumulation_steps=1,
        num_generations=SAMPLES,
        max_completion_length=MAX_NEW,
        temperature=TEMPERATURE,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        loss_type="dapo",
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        max_grad_norm=1.0,
        max_steps=steps,
        use_cpu=True,
        bf16=False,
        use_vllm=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        model_init_kwargs={"dtype": torch.float32},
    )


def trl_tokenizer(fixture: Fixture) -> Any:
    tok = load_tokenizer(fixture.tokenizer_dir)
    tok.padding_side = "left"
    return tok


def trl_dataset(fixture: Fixture, tok: Any) -> Any:
    """The training rows in TRL's conversational format, after checking the tokenisation."""
    from datasets import Dataset

    rows = read_jsonl(fixture.train_path)
    check_same_prompts(tok, rows)
    return Dataset.from_list([{"prompt": r["messages"], "label": str(r["label"])} for r in rows])


def _timed_trainer_class() -> type:
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with wall-clock timers around generation and generation+scoring."""

        phase_times: dict[str, list[float]]

        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = super()._generate_single_turn(*args, **kwargs)
            self.phase_times["generate"].append(time.perf_counter() - started)
            return result

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            started = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            self.phase_times["generate_and_score"].append(time.perf_counter() - started)
            return result

    return TimedGRPOTrainer


def run_trl(fixture: Fixture, warm: Path, out: Path, *, steps: int, seed: int) -> RunResult:
    """Train GRPOTrainer from `warm` for `steps` steps; step times, phases, rewards."""
    from transformers import PrinterCallback, TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

    shutil.rmtree(out, ignore_errors=True)
    tok = trl_tokenizer(fixture)
    clock = StepClock()
    trainer = _timed_trainer_class()(
        model=str(warm),
        reward_funcs=trl_reward,
        args=grpo_args(out, steps=steps, seed=seed),
        train_dataset=trl_dataset(fixture, tok),
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; we print tables
    trainer.phase_times = {"generate": [], "generate_and_score": []}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    trainer.train()
    wall = time.monotonic() - started
    final = out / "final"
    trainer.save_model(str(final))
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    gen, gen_score = trainer.phase_times["generate"], trainer.phase_times["generate_and_score"]
    phases = {
        "generate": gen,
        "score": [gs - g for g, gs in zip(gen, gen_score, strict=True)],
        "train": [s - gs for s, gs in zip(step_s, gen_score, strict=True)],
    }
    rewards = [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]
    return RunResult(
        "trl", step_s, rewards, wall, str(final), phases, (load_before, os.getloadavg()[0])
    )
