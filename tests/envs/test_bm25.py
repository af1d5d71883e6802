"""BM25 scores against a hand computation, and retrieval quality on the shipped corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from envs.bm25 import Bm25Index, tokenize
from envs.search import DEFAULT_CORPUS, SearchEnv, load_corpus

DOCS = ["the cat sat on the mat", "the dog sat", "cats and dogs and cats"]


def test_score_matches_the_formula_by_hand() -> None:
    index = Bm25Index(DOCS, k1=1.2, b=0.75)
    # "sat": in docs 0 and 1 (n=2 of N=3); doc 0 has 6 tokens, avgdl = (6 + 3 + 5) / 3.
    idf_sat = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    idf_the = idf_sat  # "the" is also in 2 documents
    avgdl = 14 / 3
    norm0 = 1.2 * (1 - 0.75 + 0.75 * 6 / avgdl)
    expected = idf_sat * 1 * 2.2 / (1 + norm0) + idf_the * 2 * 2.2 / (2 + norm0)
    assert index.score("the sat", 0) == pytest.approx(expected, rel=1e-12)
    idf_cats = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    norm2 = 1.2 * (1 - 0.75 + 0.75 * 5 / avgdl)
    assert index.score("cats", 2) == pytest.approx(idf_cats * 2 * 2.2 / (2 + norm2), rel=1e-12)
    assert index.score("bird", 0) == 0.0


def test_search_ranks_and_skips_non_matches() -> None:
    index = Bm25Index(DOCS)
    ranked = index.search("cats and the dog", k=5)
    assert [i for i, _ in ranked] == [2, 1, 0]
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert index.search("unicorn") == []
    assert tokenize("Apollo-11, 1969!") == ["apollo", "11", "1969"]


def test_every_shipped_question_finds_its_answer_in_the_top_three() -> None:
    env = SearchEnv(top_k=3)
    qa_path = Path(DEFAULT_CORPUS).with_name("search_qa.jsonl")
    rows = [json.loads(line) for line in qa_path.read_text().splitlines()]
    assert len(rows) >= 10 and len(load_corpus(DEFAULT_CORPUS)) >= 40
    for row in rows:
        question = row["messages"][-1]["content"]
        texts = " ".join(d["title"] + " " + d["text"] for d in env.search(question))
        assert row["label"].lower() in texts.lower(), question


def test_corpus_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "t", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected string fields"):
        load_corpus(bad)
