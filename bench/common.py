"""Shared fixtures for end-to-end benchmarks on the toy arithmetic task.

Everything a benchmark needs to compare two systems from the same starting point, built with
neutral tools (plain torch and transformers, no Physarum service):

* `build_fixture`: the toy tokenizer, train / held-out rows as JSONL, and a freshly
  initialised `glm4moe-toy` checkpoint (a Hugging Face directory both transformers and
  Physarum load);
* `sft_warm_start`: plain token cross-entropy on the chat-rendered rows (transformers'
  Glm4MoeForCausalLM, AdamW) until a target greedy accuracy, saved as an HF directory;
* `greedy_accuracy`: held-out accuracy of an HF directory with transformers' `generate`,
  scored by the project's `arithmetic` reward, so every system is judged by one evaluator;
* `RunResult`, `print_report`: one run's per-step times, phases and rewards, and the printed
  tables (step time and speed-up against the peer run of the same rep, reward curves,
  held-out accuracy).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from envs.tasks import make_rows, read_jsonl, tokenizer_corpus, write_jsonl
from models import Glm4MoeForCausalLM, get_preset, save_pretrained
from models.chat import prompt_ids, render_sft
from models.config import ModelConfig
from models.tokenizer import build_toy_tokenizer, load_tokenizer, stop_token_ids
from rewards.builtins.toy_tasks import arithmetic_score

log = logging.getLogger(__name__)

TASK_ARGS: dict[str, Any] = {"digits": 2, "ops": "+"}


@dataclass(frozen=True)
class Fixture:
    """Paths of the shared inputs; every system under test reads exactly these files."""

    tokenizer_dir: Path
    train_path: Path
    eval_path: Path
    init_dir: Path
    """A freshly initialised model (HF directory, config + safetensors, no tokenizer)."""


def build_fixture(root: Path, *, n_train: int, n_eval: int, seed: int = 0) -> Fixture:
    """Tokenizer, rows and a fresh toy model under `root` (the same seed gives the same files)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = build_toy_tokenizer(root / "tokenizer", tokenizer_corpus(seed=0))
    train_path, eval_path = root / "train.jsonl", root / "eval.jsonl"
    write_jsonl(make_rows("arithmetic", n_train, seed=seed, split="train", **TASK_ARGS), train_path)
    write_jsonl(make_rows("arithmetic", n_eval, seed=seed, split="test", **TASK_ARGS), eval_path)
    config = toy_model_config(tok)
    torch.manual_seed(seed)
    save_pretrained(Glm4MoeForCausalLM(config), root / "init")
    return Fixture(root / "tokenizer", train_path, eval_path, root / "init")


def toy_model_config(tok: Any) -> ModelConfig:
    """The `glm4moe-toy` config sized to `tok`: its vocabulary, stop tokens as EOS, its pad."""
    return get_preset(
        "glm4moe-toy",
        vocab_size=len(tok),
        eos_token_id=list(stop_token_ids(tok)),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )


def load_hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    """transformers' own Glm4MoeForCausalLM from an HF directory, fp32, on the CPU."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if type(model).__name__ != "Glm4MoeForCausalLM":
        raise ValueError(f"{model_dir}: expected a Glm4MoeForCausalLM, got {type(model).__name__}")
    return model


def _sft_batch(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 = no loss), each [B, S] int64."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (seq, lab) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(seq)] = 1
    return ids, attention, labels


def _sft_examples(tok: Any, rows: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    examples = []
    for row in rows:
        messages = [*row["messages"], {"role": "assistant", "content": str(row["label"])}]
        prompt, response, mask = render_sft(tok, messages)
        labels = [-100] * len(prompt) + [t if m else -100 for t, m in zip(response, mask)]
        examples.append((prompt + response, labels))
    return examples


def sft_warm_start(
    fixture: Fixture,
    out_dir: Path,
    *,
    max_steps: int,
    batch_size: int,
    lr: float,
    target_accuracy: float,
    seed: int = 0,
    check_every: int = 25,
) -> dict[str, float]:
    """Plain cross-entropy SFT of the fresh model on the training rows, until the greedy
    accuracy on 128 training prompts reaches `target_accuracy` (checked every `check_every`
    steps) or `max_steps`. Saves an HF directory (weights + tokenizer files) to `out_dir`.

    The toy model learns addition abruptly (accuracy jumps from ~0.1 to ~0.9 within a few
    hundred steps, at a step that varies with the seed), so a fixed step count gives warm
    starts of very different quality; stopping at a target leaves RL the same room.
    Returns {"sft/steps", "sft/loss", "sft/train_accuracy", "sft/seconds"}.
    """
    tok = load_tokenizer(fixture.tokenizer_dir)
    rows = read_jsonl(fixture.train_path)
    examples = _sft_examples(tok, rows)
    probe = rows[:128]
    model = load_hf_model(fixture.init_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, max_steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(seed)
    started, losses, accuracy, step = time.monotonic(), [], 0.0, 0
    while step < max_steps and accuracy < target_accuracy:
        model.train()
        ids, attention, labels = _sft_batch(rng.sample(examples, batch_size), tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % check_every == 0:
            accuracy = model_greedy_accuracy(model, tok, probe)
            log.info(
                "sft step %d loss %.4f train-prompt accuracy %.3f",
                step,
                statistics.fmean(losses[-check_every:]),
                accuracy,
            )
    seconds = time.monotonic() - started
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return {
        "sft/steps": float(step),
        "sft/loss": statistics.fmean(losses[-check_every:]),
        "sft/train_accuracy": accuracy,
        "sft/seconds": seconds,
    }


@torch.no_grad()
def model_greedy_accuracy(
    model: transformers.PreTrainedModel, tok: Any, rows: Sequence[dict], *, max_new_tokens: int = 8
) -> float:
    """Fraction of `rows` whose greedy completion starts with the label (the arithmetic
    reward), by transformers' generate on one left-padded batch."""
    model.eval()
    prompts = [prompt_ids(tok, row["messages"]) for row in rows]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=attention,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_token_ids(tok)),
        pad_token_id=tok.pad_token_id,
    )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    scores = [arithmetic_score(text, str(row["label"])) for text, row in zip(texts, rows)]
    return statistics.fmean(scores)


def greedy_accuracy(model_dir: Path, tokenizer_dir: Path, rows: Sequence[dict]) -> float:
    """Held-out accuracy of an HF directory; the same function judges every system."""
    return model_greedy_accuracy(load_hf_model(model_dir), load_tokenizer(tokenizer_dir), rows)


@dataclass
class RunResult:
    """One system's run: per-step wall times [s] and batch rewards, in step order."""

    name: str
    step_s: list[float]
    rewards: list[float]
    wall_s: float
    final_dir: str
    phases: dict[str, list[float]] = field(default_factory=dict)
    """Per-step seconds of named phases (e.g. generate, train)."""
    load_avg: tuple[float, float] = (float("nan"), float("nan"))
    """1-minute load average of the machine before and after the run."""
    accuracy: float = float("nan")
    rep: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} #{self.rep}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def window_mean(values: Sequence[float], start: int, stop: int | None = None) -> float:
    """Mean of values[start:stop] (nan when empty), e.g. the first / last 25 rewards."""
    window = list(values[start:stop])
    return statistics.fmean(window) if window else float("nan")


def _speedups(results: list[RunResult], skip: int, peer: str) -> dict[int, float]:
    """id(run) -> median peer step / median run step, against the peer run of the same rep."""
    peer_step = {r.rep: median(r.step_s[skip:]) for r in results if r.name == peer}
    return {
        id(r): peer_step.get(r.rep, float("nan")) / max(median(r.step_s[skip:]), 1e-12)
        for r in results
    }


def print_report(
    results: list[RunResult], *, skip: int, start_accuracy: float, steps: int, peer: str
) -> None:
    """Step-time table (with the speed-up over the `peer` run of the same rep), the reward
    curves in ten windows, and each run's first/last rewards and held-out accuracy."""
    speedups = _speedups(results, skip, peer)
    print(f"\n== wall time per step (median after {skip} warm-up steps), {steps} steps ==")
    print(f"{'run':<20}{'step s':>8}{'x peer':>7}{'run s':>8}  phases (median s)  load avg")
    for r in results:
        phases = " ".join(f"{k} {median(v[skip:]):.3f}" for k, v in r.phases.items())
        load = f"{r.load_avg[0]:.1f}->{r.load_avg[1]:.1f}"
        print(
            f"{r.label:<20}{median(r.step_s[skip:]):>8.3f}{speedups[id(r)]:>7.2f}"
            f"{r.wall_s:>8.1f}  {phases}  {load}"
        )
    for name in dict.fromkeys(r.name for r in results if r.name != peer):
        ratios = [speedups[id(r)] for r in results if r.name == name]
        cells = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"speed-up of {name} over {peer}: median {median(ratios):.2f} (per rep: {cells})")
    width = max(1, steps // 10)
    print(f"\n== batch reward, mean over windows of {width} steps ==")
    print(f"{'steps':<11}" + "".join(f"{r.label:>18}" for r in results))
    for start in range(0, steps, width):
        cells = "".join(f"{window_mean(r.rewards, start, start + width):>18.3f}" for r in results)
        print(f"{start + 1:>4}-{min(start + width, steps):<6}" + cells)
    n = min(25, max(1, steps // 4))
    print(f"\n== batch reward first {n} -> last {n} steps; held-out greedy accuracy ==")
    for r in results:
        first, last = window_mean(r.rewards, 0, n), window_mean(r.rewards, -n)
        print(
            f"{r.label:<20} reward {first:.3f} -> {last:.3f}   accuracy {start_accuracy:.3f} -> "
            f"{r.accuracy:.3f}"
        )
