"""Toy tasks: correct labels, solvable countdowns, disjoint reproducible splits, JSONL I/O."""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from envs.tasks import TASKS, make_rows, read_jsonl, split_of, tokenizer_corpus, write_jsonl
from envs.tool_calls import parse_tool_calls

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses (no eval)."""
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body), literals


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_arithmetic_rows_have_short_prompts_and_exact_labels() -> None:
    rows = make_rows("arithmetic", 300, seed=1, ops="+-*", digits=2)
    assert {r["metadata"]["op"] for r in rows} == {"+", "-", "*"}
    for row in rows:
        assert set(row) == {"id", "messages", "label", "task", "metadata"}
        assert row["task"] == "arithmetic"
        (message,) = row["messages"]
        assert message["role"] == "user"
        expression = message["content"].removesuffix("=")
        assert message["content"] == expression + "=" and len(expression) <= 5
        value, literals = _evaluate(expression)
        assert row["label"] == str(int(value))
        assert all(0 <= v < 100 for v in literals)


def test_arithmetic_digits_bound_the_operands() -> None:
    rows = make_rows("arithmetic", 200, seed=0, digits=3)
    assert max(max(r["metadata"]["a"], r["metadata"]["b"]) for r in rows) >= 100
    assert all(r["metadata"]["a"] < 1000 and r["metadata"]["b"] < 1000 for r in rows)


def test_countdown_instances_are_solvable_with_each_number_at_most_once() -> None:
    rows = make_rows("countdown", 300, seed=2)
    assert {len(r["metadata"]["numbers"]) for r in rows} == {3, 4}
    for row in rows:
        meta = row["metadata"]
        numbers, target = meta["numbers"], meta["target"]
        assert row["label"] == str(target) and 1 <= target <= 100 and target not in numbers
        assert all(1 <= n <= 25 for n in numbers)
        shown = " ".join(map(str, numbers))
        assert row["messages"] == [{"role": "user", "content": f"Use {shown} to make {target}."}]
        value, used = _evaluate(meta["solution"])
        assert value == target
        assert not Counter(used) - Counter(numbers), (used, numbers)


def test_calculator_rows_offer_the_tool_and_demonstrate_a_call() -> None:
    rows = make_rows("calculator", 100, seed=0)
    for row in rows:
        a, b = row["metadata"]["a"], row["metadata"]["b"]
        assert 1000 <= a <= 9999 and 100 <= b <= 999
        assert row["label"] == str(a * b)
        system, user = row["messages"]
        assert system["role"] == "system" and user == {"role": "user", "content": f"{a}*{b}="}
        (tool,) = row["tools"]
        assert tool["function"]["name"] == "calculator"
        assert tool["function"]["parameters"]["required"] == ["expression"]
        demo = TASKS["calculator"].demonstration(row)
        assert [m["role"] for m in demo] == ["system", "user", "assistant", "tool", "assistant"]
        call = demo[2]["tool_calls"][0]["function"]
        assert call == {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}}
        assert demo[3]["content"] == demo[4]["content"] == row["label"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_arguments_give_byte_identical_files(task: str, tmp_path: Path) -> None:
    first = write_jsonl(make_rows(task, 200, seed=7), tmp_path / "a.jsonl")
    second = write_jsonl(make_rows(task, 200, seed=7), tmp_path / "b.jsonl")
    other = write_jsonl(make_rows(task, 200, seed=8), tmp_path / "c.jsonl")
    assert _sha(first) == _sha(second) != _sha(other)
    assert read_jsonl(first) == make_rows(task, 200, seed=7)
    assert make_rows(task, 50, seed=7) == make_rows(task, 200, seed=7)[:50]


def _problem_key(row: dict) -> str:
    meta = row["metadata"]
    if row["task"] == "countdown":
        return f"{sorted(meta['numbers'])}->{meta['target']}"
    return f"{meta['a']}{meta['op']}{meta['b']}"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_test_splits_never_share_a_problem(task: str) -> None:
    params = {"digits": 1} if task == "arithmetic" else {}  # small space: overlap would show
    train = {_problem_key(r) for seed in (0, 1) for r in make_rows(task, 400, seed, **params)}
    test = {_problem_key(r) for r in make_rows(task, 100, 0, "test", **params)}
    assert train and test and not train & test
    assert all(r["metadata"]["split"] == "test" for r in make_rows(task, 5, 0, "test"))


def test_split_is_a_stable_hash_of_the_problem() -> None:
    keys = [f"{a}+{b}" for a in range(100) for b in range(100)]
    test = [k for k in keys if split_of("arithmetic", k) == "test"]
    assert 0.03 < len(test) / len(keys) < 0.07
    assert split_of("arithmetic", "37+58") == split_of("arithmetic", "37+58")


def test_unique_rows_and_exhausted_space() -> None:
    rows = make_rows("arithmetic", 80, seed=0, digits=1, unique=True)
    assert len({r["messages"][0]["content"] for r in rows}) == 80
    assert len({r["id"] for r in rows}) == 80
    with pytest.raises(ValueError, match="distinct train problems"):
        make_rows("arithmetic", 100, seed=0, digits=1, unique=True)  # only ~95 exist


def test_unknown_task_lists_the_valid_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown task 'algebra'.*arithmetic.*calculator.*countdown"
    ):
        make_rows("algebra", 3)


@pytest.mark.parametrize(
    ("task", "params", "fragment"),
    [
        ("arithmetic", {"digits": 0}, "param 'digits'"),
        ("arithmetic", {"ops": "+/"}, "param 'ops'"),
        ("arithmetic", {"digit": 2}, "unknown param 'digit'"),
        ("countdown", {"min_numbers": 5, "max_numbers": 3}, "min_numbers"),
        ("calculator", {"a_digits": "many"}, "param 'a_digits'"),
        ("calculator", {"unique": "yes"}, "param 'unique'"),
    ],
)
def test_bad_params_name_the_param(task: str, params: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        make_rows(task, 3, **params)


def test_bad_split_and_n() -> None:
    with pytest.raises(ValueError, match="split"):
        make_rows("arithmetic", 3, split="validation")
    with pytest.raises(ValueError, match="n: expected"):
        make_rows("arithmetic", -1)


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    good = json.dumps(make_rows("arithmetic", 1)[0])
    path.write_text(f"{good}\n\n{{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text(f'{good}\n{{"id": "x", "messages": []}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl:2: missing key\(s\) \['label', 'task'\]"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_corpus_covers_prompts_answers_tool_calls_and_schemas() -> None:
    lines = TASKS["calculator"].corpus_lines(n=5, seed=0)
    rows = make_rows("calculator", 5, seed=0)
    for row in rows:
        assert f"{row['metadata']['expression']}=" in lines
        assert row["label"] in lines
    calls = [line for line in lines if line.startswith("<tool_call>")]
    assert len(calls) == 5 and all(parse_tool_calls(c).ok for c in calls)
    assert any('"name": "calculator"' in line for line in lines)
    corpus = tokenizer_corpus(n_per_task=10, seed=0)
    assert any(line.startswith("Use ") and "to make" in line for line in corpus)
    assert any(line.endswith("=") and line[0].isdigit() for line in corpus)
