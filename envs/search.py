"""The search tool environment: BM25 retrieval over a local JSONL document set.

Corpus: JSONL rows ``{"id": str, "title": str, "text": str}``; by default the small
encyclopedia shipped in ``envs/data/search_corpus.jsonl`` (questions answerable from it are in
``envs/data/search_qa.jsonl``). Tool ``search(query)``: the `top_k` best documents as
``[id] title: text`` (text cut to `snippet_chars`), or ``no results``.

The episode is done when the model answers without a tool call. When the row has a label,
the reward is 1.0 if the label (case-insensitive, whitespace-normalised) occurs in the
answer, else 0.0; without one the environment gives no reward.

`SearchEnv.factory(corpus_path=..., ...)` reads the corpus and builds the index once; every
episode's environment shares that immutable index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from envs.base import StepResult, row_label, row_messages
from envs.bm25 import Bm25Index
from envs.toolbox import Tool, ToolBox, ToolError

DEFAULT_CORPUS = Path(__file__).with_name("data") / "search_corpus.jsonl"
SEARCH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the encyclopedia; returns the best matching articles.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "keywords"}},
            "required": ["query"],
        },
    },
}


def load_corpus(path: str | Path) -> list[dict[str, str]]:
    """Read a JSONL corpus; ValueError naming the line of a malformed row."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not all(isinstance(row.get(k), str) for k in ("id", "title", "text")):
                raise ValueError(f"{path}:{number}: expected string fields id, title, text")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the corpus is empty")
    return rows


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


class SearchIndex:
    """Documents plus their BM25 index (read-only after construction)."""

    def __init__(self, documents: list[dict[str, str]]) -> None:
        self.documents = documents
        self.bm25 = Bm25Index([f"{d['title']} {d['text']}" for d in documents])

    @classmethod
    def from_jsonl(cls, path: str | Path) -> SearchIndex:
        return cls(load_corpus(path))


class SearchEnv:
    """One episode with a search tool (see module doc)."""

    def __init__(
        self,
        *,
        index: SearchIndex | None = None,
        corpus_path: str | None = None,
        top_k: int = 3,
        snippet_chars: int = 300,
        max_calls: int = 2,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {top_k}")
        self.index = (
            index if index is not None else SearchIndex.from_jsonl(corpus_path or DEFAULT_CORPUS)
        )
        self.top_k, self.snippet_chars = top_k, snippet_chars
        self.toolbox = ToolBox([Tool(SEARCH_TOOL, self._search)], max_calls=max_calls)
        self.tools: list[dict[str, Any]] | None = self.toolbox.schemas
        self.label: str | None = None

    @classmethod
    def factory(cls, *, corpus_path: str | None = None, **options: Any) -> Callable[[], SearchEnv]:
        """Read the corpus and build the index once; options: top_k, snippet_chars, max_calls."""
        index = SearchIndex.from_jsonl(corpus_path or DEFAULT_CORPUS)
        cls(index=index, **options)  # validate the options now

        def make() -> SearchEnv:
            return cls(index=index, **options)

        return make

    def reset(self, task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.label = row_label(task_row)
        return row_messages(task_row)

    async def step(self, assistant_text: str) -> StepResult:
        turn = await self.toolbox.respond(assistant_text)
        if not turn.answered:
            return StepResult(observations=turn.observations)
        if self.label is None:
            return StepResult(done=True)
        found = _normalise(self.label) in _normalise(assistant_text)
        return StepResult(reward=float(found), done=True)

    def search(self, query: str) -> list[dict[str, str]]:
        """The top-k documents for `query`, best first."""
        hits = self.index.bm25.search(query, self.top_k)
        return [self.index.documents[i] for i, _ in hits]

    def _search(self, arguments: dict[str, Any]) -> str:
        query = str(arguments["query"]).strip()
        if not query:
            raise ToolError("search: the query is empty")
        hits = self.search(query)
        if not hits:
            return "no results"
        return "\n".join(
            f"[{d['id']}] {d['title']}: {d['text'][: self.snippet_chars]}" for d in hits
        )
