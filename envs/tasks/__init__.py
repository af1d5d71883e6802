"""Deterministic toy tasks (arithmetic, countdown, calculator tool use) with a held-out split.

rows = make_rows("arithmetic", 1000, seed=0, split="train", digits=2, ops="+")
write_jsonl(rows, "train.jsonl")
TASKS["calculator"].demonstration(rows[0])   # prompt + reference assistant turns (SFT)
TASKS["countdown"].corpus_lines(n=100, seed=0)  # text for tokenizer training
"""

from envs.tasks.base import SPLITS, TEST_FRACTION, Problem, TaskParams, TaskSpec, split_of
from envs.tasks.calculator import CALCULATOR_TOOL
from envs.tasks.jsonl import read_jsonl, write_jsonl
from envs.tasks.registry import TASKS, get_task, make_rows, tokenizer_corpus

__all__ = [
    "CALCULATOR_TOOL",
    "SPLITS",
    "TASKS",
    "TEST_FRACTION",
    "Problem",
    "TaskParams",
    "TaskSpec",
    "get_task",
    "make_rows",
    "read_jsonl",
    "split_of",
    "tokenizer_corpus",
    "write_jsonl",
]
