"""Bad data files (issue 18, items 4, 6 and 8): refused before any actor starts, each error
naming the file and, for a bad row, its line; the file itself is never changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from buffer.dataset import DatasetError, parse_dataset
from configs import load_job
from envs.tasks import read_jsonl
from physarum.errors import UserError
from physarum.prepare import check_rows, prepare
from physarum.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"id": "a", "messages": [{"role": "user", "content": "1+1="}], "label": "2", "task": "t"}


def _row(**change) -> bytes:
    return json.dumps({**GOOD, **change}).encode()


# (case id, file bytes, text the error must contain besides the file name)
RL_CASES = [
    ("empty", b"", "has no usable row (empty)"),
    ("blank-lines", b"\n  \n\n", "has no usable row (empty)"),
    ("all-bad-json", b"{not json\n[1, 2\n", ":1: invalid JSON"),
    ("non-utf8", b"\xff\xfe{}\n", ":1: not UTF-8 (byte 0xff at column 1)"),
    ("non-utf8-line-3", _row(id="1") + b"\n" * 2 + b'{"id": "\xc3\x28"}\n', None),
    ("rows-not-objects", b"[1]\n2\n", "expected a JSON object, got list"),
    ("missing-messages", b'{"id": "x"}\n', "missing required key(s) ['messages']"),
    ("bool-id", _row(id=True) + b"\n", "id must be a non-empty string or an integer"),
    ("empty-id", _row(id="") + b"\n", "id must be a non-empty string"),
    ("nan-value", b'{"id": "x", "messages": [], "label": NaN}\n', "not JSON-serialisable"),
]


@pytest.mark.parametrize(
    ("content", "needle"), [c[1:] for c in RL_CASES], ids=[c[0] for c in RL_CASES]
)
def test_rl_dataset_with_no_usable_row_is_refused(tmp_path, content, needle):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    job = load_job(ROOT / "configs/toy_grpo.yaml", [f"data.train_path={path}"])
    if needle is None:  # one good row: usable, the bad line is skipped (and counted)
        assert check_rows(job, path, "data.train_path") == 1
        report = parse_dataset(path).report
        assert (
            report.n_skipped == 1
            and report.errors[0] == "train.jsonl:3: not UTF-8 (byte 0xc3 at column 9)"
        )
    else:
        with pytest.raises(UserError) as err:
            check_rows(job, path, "data.train_path")
        assert "data.train_path" in str(err.value) and "train.jsonl" in str(err.value)
        assert needle in str(err.value)
    assert path.read_bytes() == content


def test_fail_mode_names_the_first_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_row(id="1") + b"\n" + _row(id="1") + b"\n")
    job = load_job(
        ROOT / "configs/toy_grpo.yaml", [f"data.train_path={path}", "data.on_bad_row=fail"]
    )
    with pytest.raises(UserError, match=r"train.jsonl:2: duplicate id '1'"):
        check_rows(job, path, "data.train_path")


# SFT / rejection sampling read the file whole, strictly: the first bad line stops the job
SFT_CASES = [
    ("non-utf8", _row() + b"\n" + b"\x80abc\n", ":2: not UTF-8 (byte 0x80 at column 1)"),
    ("bad-json", _row() + b"\n{x\n", ":2: not valid JSON"),
    ("missing-label", json.dumps({"id": "1", "messages": [], "task": "t"}).encode(), ":1: missing"),
    ("messages-not-list", _row(messages="hi"), ":1: 'messages' must be a list"),
    ("empty", b"", "has no usable row (empty)"),
]


@pytest.mark.parametrize(
    ("content", "needle"), [c[1:] for c in SFT_CASES], ids=[c[0] for c in SFT_CASES]
)
def test_sft_dataset_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(content)
    job = load_job(ROOT / "configs/toy_sft.yaml", [f"data.train_path={path}"])
    with pytest.raises(UserError) as err:
        check_rows(job, path, "data.train_path")
    assert "sft.jsonl" in str(err.value) and needle in str(err.value)
    assert path.read_bytes() == content


def test_read_jsonl_reports_encoding_errors_with_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(_row() + b"\n" + _row(id="b") + b"\n" + b'{"id": "\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 \(byte 0xe9 at column 9\)"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("train.csv", b"id,messages\n", "unknown dataset format"),
        ("train.parquet", b"not parquet", "not a readable Parquet file"),
    ],
    ids=["unknown-format", "bad-parquet"],
)
def test_unreadable_dataset_formats(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=needle):
        parse_dataset(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small toy tokenizer, built once (prepare would build the full one per test)."""
    from envs.tasks import tokenizer_corpus
    from models.tokenizer import build_toy_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_toy_tokenizer(path, tokenizer_corpus(n_per_task=50), vocab_size=300)
    return path


def test_missing_dataset_file_is_refused_at_prepare(tmp_path, tokenizer_dir):
    job = load_job(
        ROOT / "configs/toy_grpo.yaml",
        [
            f"data.train_path={tmp_path / 'nope.jsonl'}",
            f"run_dir={tmp_path / 'run'}",
            f"tokenizer.path={tokenizer_dir}",
        ],
    )
    with pytest.raises(UserError, match=r"data.train_path: .*nope.jsonl does not exist"):
        prepare(job, RunDir(tmp_path / "run").create())


def test_empty_dataset_fails_in_prepare_before_the_model_is_built(tmp_path, tokenizer_dir):
    """prepare runs before any actor (JobContext.__init__): the empty file is refused there,
    and no initial model is written."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"")
    run = RunDir(tmp_path / "run").create()
    job = load_job(
        ROOT / "configs/toy_grpo.yaml",
        [f"data.train_path={path}", f"run_dir={run.root}", f"tokenizer.path={tokenizer_dir}"],
    )
    with pytest.raises(UserError, match="has no usable row"):
        prepare(job, run)
    assert not run.init_model.exists()
