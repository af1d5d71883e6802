"""Loading prompt datasets: bad rows skipped with line numbers or failing the load; idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buffer.dataset import DatasetError, parse_dataset
from buffer.prompt_queue import DatasetMismatchError
from tests.buffer.helpers import write_prompts

MESSAGES = [{"role": "user", "content": "2+2?"}]


def _bad_jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"id": "a", "messages": MESSAGES}),  # 1 ok
        "{not json",  # 2 invalid JSON
        json.dumps({"id": "b"}),  # 3 missing messages
        "",  # 4 blank: ignored, not a row
        json.dumps([1, 2]),  # 5 not an object
        json.dumps({"id": "a", "messages": MESSAGES}),  # 6 duplicate id
        json.dumps({"id": 7, "messages": MESSAGES, "label": "4"}),  # 7 ok (int id)
        json.dumps({"id": True, "messages": MESSAGES}),  # 8 bool id
        json.dumps({"id": "c", "messages": None}),  # 9 null messages
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_jsonl_rows_are_skipped_with_line_numbers(tmp_path: Path) -> None:
    parsed = parse_dataset(_bad_jsonl(tmp_path / "d.jsonl"))
    assert parsed.ids == ["a", "7"]
    assert json.loads(parsed.rows[1])["label"] == "4"
    report = parsed.report
    assert (report.n_loaded, report.n_skipped) == (2, 6)
    lines = [int(e.split(":")[1]) for e in report.errors]
    assert lines == [2, 3, 5, 6, 8, 9]
    assert "invalid JSON" in report.errors[0]
    assert "missing required key(s) ['messages']" in report.errors[1]
    assert "duplicate id 'a'" in report.errors[3]


def test_fail_mode_stops_at_the_first_bad_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: invalid JSON"):
        parse_dataset(_bad_jsonl(tmp_path / "d.jsonl"), on_bad_row="fail")


def test_custom_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "hi"}) + "\n")
    assert parse_dataset(path, required_keys=("id", "prompt")).ids == ["x"]
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: missing required key\(s\) \['messages'\]"):
        parse_dataset(path, on_bad_row="fail")


def test_parquet_rows_are_checked_too(tmp_path: Path) -> None:
    table = pa.table({"id": ["p0", None, "p2"], "messages": [MESSAGES, MESSAGES, MESSAGES]})
    pq.write_table(table, tmp_path / "d.parquet")
    parsed = parse_dataset(tmp_path / "d.parquet")
    assert parsed.ids == ["p0", "p2"]
    assert json.loads(parsed.rows[0])["messages"] == MESSAGES
    assert parsed.report.errors == ["d.parquet:2: missing required key(s) ['id']"]


def test_unusable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset file"):
        parse_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("id,messages\n")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        parse_dataset(tmp_path / "d.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        parse_dataset(tmp_path / "bad.parquet")


def test_store_load_counts_bad_rows_and_is_idempotent(make_store, tmp_path: Path) -> None:
    store = make_store()
    report = store.load_prompts(_bad_jsonl(tmp_path / "d.jsonl"), seed=1)
    assert (report.n_loaded, report.n_skipped, report.already_loaded) == (2, 6, False)
    stats = store.stats()
    assert (stats.prompts_total, stats.bad_rows, stats.prompts_queued) == (2, 6, 2)

    leased = store.lease_prompts("w", 1)
    again = make_store().load_prompts(tmp_path / "d.jsonl", seed=1)  # e.g. a restarted worker
    assert again.already_loaded and again.n_skipped == 6 and again.errors == report.errors
    assert store.stats().cursor == 1  # the reload did not reset the cursor
    assert store.lease_prompts("w", 5, lease_seconds=30)[0].prompt_id != leased[0].prompt_id

    with pytest.raises(DatasetMismatchError, match=r"different \['seed'\]"):
        store.load_prompts(tmp_path / "d.jsonl", seed=2)
    with pytest.raises(DatasetMismatchError, match="fingerprint"):
        store.load_prompts(write_prompts(tmp_path / "other.jsonl", 3))


def test_store_load_in_fail_mode_writes_nothing(make_store, tmp_path: Path) -> None:
    store = make_store()
    with pytest.raises(DatasetError, match=r"d\.jsonl:2"):
        store.load_prompts(_bad_jsonl(tmp_path / "d.jsonl"), on_bad_row="fail")
    assert store.stats().prompts_total == 0
    assert not store.client.exists(store.keys.meta)
