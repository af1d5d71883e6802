"""Okapi BM25 ranking over a small in-memory document set (the search environment's index).

score(q, d) = sum over query terms t present in d of
    idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
with idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)) (the Lucene variant, always > 0).
Tokens are lower-cased runs of letters and digits. Each query term counts once per
occurrence in the query.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens."""
    return _TOKEN.findall(text.lower())


class Bm25Index:
    """An immutable BM25 index; safe to share between threads and episodes."""

    def __init__(self, documents: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        if not documents:
            raise ValueError("documents: expected at least one document")
        self.k1, self.b = k1, b
        self._term_counts = [Counter(tokenize(d)) for d in documents]
        self._lengths = [sum(c.values()) for c in self._term_counts]
        self._avgdl = max(sum(self._lengths) / len(documents), 1e-9)
        n_docs = len(documents)
        frequency = Counter(t for counts in self._term_counts for t in counts)
        self._idf = {
            t: math.log(1.0 + (n_docs - n + 0.5) / (n + 0.5)) for t, n in frequency.items()
        }

    def __len__(self) -> int:
        return len(self._term_counts)

    def score(self, query: str, index: int) -> float:
        """BM25 score of document `index` for `query`."""
        counts, length = self._term_counts[index], self._lengths[index]
        norm = self.k1 * (1.0 - self.b + self.b * length / self._avgdl)
        total = 0.0
        for term in tokenize(query):
            tf = counts.get(term, 0)
            if tf:
                total += self._idf[term] * tf * (self.k1 + 1.0) / (tf + norm)
        return total

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        """The `k` best (document index, score) pairs with score > 0, best first."""
        terms = set(tokenize(query))
        candidates = [i for i, counts in enumerate(self._term_counts) if terms & counts.keys()]
        scored = [(i, self.score(query, i)) for i in candidates]
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        return scored[:k]
