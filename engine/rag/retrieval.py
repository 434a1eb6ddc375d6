"""Retrieval: dense search in the FAISS cache, keyword search in FTS5, fused by their scores.

In hybrid mode the first passages are then scored again by a stronger embedder (``rerank``).

The FAISS index of a collection is a cache of the vectors in SQLite. It is tagged with
the collection's ``generation`` (bumped by every committed change); when the tags differ,
or the files are missing or damaged, it is rebuilt from SQLite and saved again.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.rag.collections import Collection, CollectionStore
from engine.rag.passages import StoredChunk
from engine.rag.reading import embedded_text
from engine.rag.rerank import RERANK_DEPTH, rerank
from engine.store.search import fts_phrase

log = logging.getLogger(__name__)

# Hybrid search fuses the two methods' scores, each scaled into [0, 1] over its own
# candidates: the cosine min-max scaled, the BM25 score divided by the best one; a chunk
# one method did not return gets 0 from it. ``DENSE_WEIGHT`` is the dense share.
# Measured on the two real sets of bench/bench_rag_quality.py against reciprocal rank
# fusion (k = 60): hit@1 0.475 -> 0.550 and 0.750 -> 0.775, MRR@10 0.633 -> 0.695 and
# 0.819 -> 0.834. Equal weights; 0.4-0.6 were within one question of each other, so the
# weight is not tuned further (Bruch et al., 2023, found the same of convex fusion).
DENSE_WEIGHT = 0.5
# Each method contributes ``POOL`` candidates (k of them where k is larger). The min-max
# scale of the cosine depends on how many there are, so a fixed number keeps the order the
# same for every k: the first 5 of a search for 30 are the search for 5.
POOL = 100
MODES = ("dense", "keyword", "hybrid")

# Words that carry no topic: left out of keyword queries so that "what is the ..."
# questions rank by their content words. Short and English-only on purpose.
_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "there",
        "these",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
        "about",
        "into",
        "me",
        "my",
        "we",
        "our",
    }
)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class SearchResult:
    chunk: StoredChunk
    score: float  # hybrid: the fused score (the second stage's in its top); else the method's
    dense_score: float | None  # cosine similarity, when dense search found it
    dense_rank: int | None
    keyword_rank: int | None
    judged: float | None = None  # the cross-encoder's relevance logit, where it read it

    def to_public(self) -> dict[str, Any]:
        return {
            "path": self.chunk.path,
            "page": self.chunk.page,
            "text": self.chunk.text,
            "score": self.score,
            "line_start": self.chunk.line_start,
            "line_end": self.chunk.line_end,
            "heading": self.chunk.heading,
            "dense_score": self.dense_score,
        }


def content_words(text: str) -> list[str]:
    """The lower-cased words of ``text`` that carry a topic (stopwords left out)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def keyword_query(text: str) -> str | None:
    """An FTS5 query OR-ing the content words of ``text`` (None when there are none)."""
    words = content_words(text) or _WORD.findall(text.lower())
    if not words:
        return None
    return " OR ".join(fts_phrase(w) for w in dict.fromkeys(words))


def fuse(
    dense: list[tuple[int, float]], keyword: list[tuple[int, float]]
) -> list[tuple[int, float]]:
    """Hybrid ranking: ``DENSE_WEIGHT`` x scaled cosine + the rest x scaled BM25, best first.

    Both lists are (chunk id, score) best first, as ``Retriever.dense``/``keyword`` give
    them (BM25 already sign-flipped to higher-is-better). Ties keep dense order first.
    """
    fused: dict[int, float] = {}
    if dense:
        top, low = dense[0][1], dense[-1][1]
        span = top - low
        for cid, score in dense:
            fused[cid] = DENSE_WEIGHT * ((score - low) / span if span > 0 else 1.0)
    if keyword:
        best = keyword[0][1]
        for cid, score in keyword:
            share = score / best if best > 0 else 1.0
            fused[cid] = fused.get(cid, 0.0) + (1.0 - DENSE_WEIGHT) * share
    return sorted(fused.items(), key=lambda kv: kv[1], reverse=True)


class Retriever:
    """Searches collections; keeps each collection's vector index loaded once per process."""

    def __init__(
        self, store: CollectionStore, home: Path, embedder_for: Callable[[str], Any]
    ) -> None:
        self._store = store
        self._home = home
        self._embedder_for = embedder_for
        self._indexes: dict[int, tuple[int, Any]] = {}
        self._lock = threading.Lock()

    def index_folder(self, collection: Collection) -> Path:
        return self._home / "collections" / str(collection.id)

    def vector_index(self, collection: Collection) -> Any:
        """The collection's vector index at its current generation (loaded or rebuilt)."""
        from engine.rag.vector_index import VectorIndex

        generation = self._store.generation(collection.id)
        with self._lock:
            cached = self._indexes.get(collection.id)
            if cached is not None and cached[0] == generation:
                return cached[1]
            folder = self.index_folder(collection)
            index = VectorIndex.load(folder)
            meta = index.meta if index is not None else {}
            if (
                index is None
                or meta.get("generation") != generation
                or meta.get("embedder") != collection.embedder
            ):
                index = self._rebuild(collection, generation)
            self._indexes[collection.id] = (generation, index)
            return index

    def _rebuild(self, collection: Collection, generation: int) -> Any:
        from engine.rag.vector_index import VectorIndex

        ids, vectors = self._store.passages.indexed_vectors(collection)
        dimension = (
            vectors.shape[1] if len(ids) else self._embedder_for(collection.embedder).dimension
        )
        index = VectorIndex.build(ids, vectors, dimension)
        index.save(
            self.index_folder(collection),
            meta={"generation": generation, "embedder": collection.embedder},
        )
        log.info(
            "rebuilt the vector index of %s from SQLite (%d vectors)", collection.name, len(ids)
        )
        return index

    def refresh(self, collection: Collection) -> None:
        """Bring the saved index up to date (after indexing) so the next search is fast."""
        self.vector_index(collection)

    def forget(self, collection: Collection) -> None:
        with self._lock:
            self._indexes.pop(collection.id, None)

    def dense(self, collection: Collection, query: str, k: int) -> list[tuple[int, float]]:
        index = self.vector_index(collection)
        if len(index) == 0:
            return []
        vector = self._embedder_for(collection.embedder).encode([query])[0]
        return [(int(i), float(s)) for i, s in index.search(vector, k)]

    def keyword(self, collection: Collection, query: str, k: int) -> list[tuple[int, float]]:
        fts = keyword_query(query)
        if fts is None:
            return []
        # bm25() is lower-is-better; flip the sign so every score is higher-is-better.
        return [(i, -s) for i, s in self._store.passages.keyword_search(collection, fts, k)]

    def search(
        self, collection: Collection, query: str, k: int = 5, mode: str = "hybrid"
    ) -> list[SearchResult]:
        """The ``k`` best chunks for ``query``: dense, keyword, or both fused (see ``fuse``)."""
        if not query.strip():
            raise InvalidInput("the query is empty")
        if mode not in MODES:
            raise InvalidInput(f"unknown search mode {mode!r}", hint=f"use one of {MODES}")
        if k < 1:
            raise InvalidInput("k must be at least 1")
        pool = max(k, POOL)
        dense = self.dense(collection, query, pool) if mode != "keyword" else []
        keyword = self.keyword(collection, query, pool) if mode != "dense" else []
        dense_rank = {cid: r for r, (cid, _) in enumerate(dense, 1)}
        dense_score = dict(dense)
        keyword_rank = {cid: r for r, (cid, _) in enumerate(keyword, 1)}
        if mode == "dense":
            ranked = dense
        elif mode == "keyword":
            ranked = keyword
        else:
            ranked = fuse(dense, keyword)
        # Over-fetch: chunks of documents being re-indexed drop out in the join.
        depth = max(k * 2, RERANK_DEPTH) if mode == "hybrid" else k * 2
        chunks = self._store.passages.chunks([cid for cid, _ in ranked[:depth]])
        judged: dict[int, float] = {}
        if mode == "hybrid":

            def text_of(cid: int) -> str | None:
                chunk = chunks.get(cid)
                return None if chunk is None else embedded_text(chunk.text, chunk.heading)

            reranked = rerank(ranked, keyword, text_of, query, fuse)
            ranked, judged = reranked.ranked, reranked.judged
        results = []
        for cid, score in ranked:
            chunk = chunks.get(cid)
            if chunk is None:
                continue
            results.append(
                SearchResult(
                    chunk,
                    score,
                    dense_score.get(cid),
                    dense_rank.get(cid),
                    keyword_rank.get(cid),
                    judged.get(cid),
                )
            )
            if len(results) == k:
                break
        return results
