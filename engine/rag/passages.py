"""What search reads of a collection's indexed chunks: texts, vectors and keyword matches.

Only chunks of documents in state ``indexed`` are read: a document being indexed again
drops out of search until its last transaction, and comes back whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from engine.rag.scanner import shown_path
from engine.store.db import Database
from engine.store.search import fts_phrase

if TYPE_CHECKING:
    import numpy as np

    from engine.rag.collections import Collection

# A query word in a passage's heading path (title, section, subsection) counts this many
# times one in its text: a heading names what the whole passage is about.
HEADING_WEIGHT = 2.0


@dataclass(frozen=True)
class StoredChunk:
    id: int
    document_id: int
    path: str  # shown form; ``path_of_shown`` gives the OS path back
    ordinal: int
    text: str
    page: int | None
    line_start: int | None
    line_end: int | None
    heading: str | None


def _chunk(row: sqlite3.Row) -> StoredChunk:
    values = {f.name: row[f.name] for f in fields(StoredChunk)}
    return StoredChunk(**{**values, "path": shown_path(row["path"])})


class Passages:
    """Reads the chunks, vectors and FTS5 index of the collection tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def chunks(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        """Chunks of indexed documents by id (others are left out)."""
        result: dict[int, StoredChunk] = {}
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            rows = self.db.query(
                "SELECT c.*, d.path FROM chunks c JOIN documents d ON d.id = c.document_id "
                f"WHERE d.state = 'indexed' AND c.id IN ({','.join('?' * len(part))})",
                tuple(part),
            )
            result.update((r["id"], _chunk(r)) for r in rows)
        return result

    def indexed_vectors(self, collection: Collection) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, float32 vectors) of every indexed chunk: what the FAISS cache holds."""
        import numpy as np

        rows = self.db.query(
            "SELECT c.id, e.vector FROM chunks c JOIN documents d ON d.id = c.document_id "
            "JOIN embeddings e ON e.text_hash = c.text_hash AND e.embedder = ? "
            "AND e.model_key = ? "
            "WHERE d.collection_id = ? AND d.state = 'indexed' ORDER BY c.id",
            (collection.embedder, collection.embedder_key, collection.id),
        )
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32)
        blob = b"".join(r[1] for r in rows)
        vectors = np.frombuffer(blob, dtype=np.float16).reshape(len(rows), -1)
        return ids, vectors.astype(np.float32)

    def word_counts(self, collection: Collection, words: list[str], cap: int) -> dict[str, int]:
        """How many indexed chunks of the collection hold each of ``words`` (FTS5's
        stemming), counted up to ``cap + 1``: enough to tell the rare from the rest."""
        counts = {}
        for word in words:
            row = self.db.query(
                "SELECT count(*) FROM (SELECT 1 FROM chunks_fts "
                "JOIN chunks c ON c.id = chunks_fts.rowid "
                "JOIN documents d ON d.id = c.document_id WHERE chunks_fts MATCH ? "
                "AND d.collection_id = ? AND d.state = 'indexed' LIMIT ?)",
                (fts_phrase(word), collection.id, cap + 1),
            )
            counts[word] = int(row[0][0])
        return counts

    def words_in(self, words: list[str], chunk_ids: list[int]) -> set[str]:
        """The ``words`` found on the pages of the chunks ``chunk_ids`` (their documents'
        where they have no pages), by FTS5's stemming."""
        if not chunk_ids:
            return set()
        marks = ",".join("?" * len(chunk_ids))
        return {
            word
            for word in words
            if self.db.query(
                "SELECT 1 FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
                "WHERE chunks_fts MATCH ? AND EXISTS (SELECT 1 FROM chunks r WHERE r.id IN "
                f"({marks}) AND r.document_id = c.document_id AND r.page IS c.page) LIMIT 1",
                (fts_phrase(word), *chunk_ids),
            )
        }

    def keyword_search(
        self, collection: Collection, fts_query: str, limit: int
    ) -> list[tuple[int, float]]:
        """(chunk id, bm25) of the best keyword matches among indexed chunks."""
        rows = self.db.query(
            f"SELECT c.id, bm25(chunks_fts, 1.0, {HEADING_WEIGHT}) AS score FROM chunks_fts "
            "JOIN chunks c ON c.id = chunks_fts.rowid JOIN documents d ON d.id = c.document_id "
            "WHERE chunks_fts MATCH ? AND d.collection_id = ? AND d.state = 'indexed' "
            "ORDER BY score LIMIT ?",
            (fts_query, collection.id, limit),
        )
        return [(r[0], float(r[1])) for r in rows]
