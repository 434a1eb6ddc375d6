"""Document collections in SQLite: collections, their sources, documents with state, and the
writes of chunks and vectors (what search reads of them: ``engine.rag.passages``)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from engine.errors import AlreadyExists, InvalidInput, NotFound
from engine.rag.passages import Passages
from engine.rag.scanner import db_path, os_path, shown_path
from engine.store.db import Database

if TYPE_CHECKING:
    import numpy as np

_NAME_RE = re.compile(r"^[\w][\w .+-]{0,63}$")
STATES = ("pending", "indexed", "failed", "skipped")
# Lone surrogates: what Python makes of bytes that are not UTF-8. SQLite refuses them.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def safe_text(text: str) -> str:
    """``text`` with any lone surrogate (never valid UTF-8) shown as U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    embedder: str  # the id the user gave: all-minilm-l6-v2 or a folder path
    generation: int  # bumped by every committed change to the collection's chunks
    created_at: str
    # The content hash of the embedder's model files that the chunks and vectors were made
    # with; None until the first sync (and in databases older than content keys).
    embedder_key: str | None = None
    # The version of the chunker that cut its chunks (``engine.rag.chunking``); None: one
    # from before versions were kept.
    chunker_version: int | None = None


@dataclass(frozen=True)
class Source:
    """A file or folder the user added, with the patterns it was added with."""

    path: str  # the OS path (see ``db_path``)
    include: tuple[str, ...]
    exclude: tuple[str, ...]


@dataclass(frozen=True)
class Document:
    id: int
    path: str  # shown form (valid Unicode); ``os_path`` opens the file
    size: int | None
    mtime_ns: int | None
    content_hash: str | None
    state: str
    error: str | None
    chunk_count: int
    pages: int | None
    os_path: str = ""

    def to_public(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "state": self.state,
            "chunks": self.chunk_count,
            "error": self.error,
            "pages": self.pages,
        }


@dataclass(frozen=True)
class NewChunk:
    ordinal: int
    text: str
    page: int | None
    line_start: int | None
    line_end: int | None
    heading: str | None
    text_hash: str


def _collection(row: sqlite3.Row) -> Collection:
    return Collection(
        row["id"],
        row["name"],
        row["embedder"],
        row["generation"],
        row["created_at"],
        row["embedder_key"],
        row["chunker_version"],
    )


_DOCUMENT_COLUMNS = tuple(f.name for f in fields(Document) if f.name not in ("path", "os_path"))


def _document(row: sqlite3.Row) -> Document:
    values = {name: row[name] for name in _DOCUMENT_COLUMNS}
    return Document(path=shown_path(row["path"]), os_path=os_path(row["path"]), **values)


class CollectionStore:
    """Reads and writes the collection tables; every write is one short transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.passages = Passages(db)  # what search reads

    # -- collections ----------------------------------------------------------------

    def create(self, name: str, embedder: str, chunker_version: int) -> Collection:
        name = name.strip()
        if not _NAME_RE.match(name):
            raise InvalidInput(
                f"invalid collection name {name!r}",
                hint="use up to 64 letters, digits, spaces, '.', '+', '_' or '-'",
            )
        try:
            self.db.execute(
                "INSERT INTO collections (name, embedder, created_at, chunker_version) "
                "VALUES (?, ?, ?, ?)",
                (name, embedder, _now(), chunker_version),
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"a collection named {name!r} exists already") from exc
        return self.get(name)

    def get(self, name: str) -> Collection:
        row = self.db.query_one("SELECT * FROM collections WHERE name = ?", (name,))
        if row is None:
            known = ", ".join(c.name for c in self.all()) or "none"
            raise NotFound(f"no collection {name!r}", hint=f"collections: {known}")
        return _collection(row)

    def all(self) -> list[Collection]:
        return [_collection(r) for r in self.db.query("SELECT * FROM collections ORDER BY name")]

    def remove(self, collection: Collection) -> None:
        self.db.execute("DELETE FROM collections WHERE id = ?", (collection.id,))

    def set_embedder(self, collection: Collection, embedder: str) -> None:
        """Switch the embedder; every document must then be indexed again.

        The content key is cleared: the next sync records the new model's (it has nothing
        indexed to check against).
        """
        self._reindex(collection, "embedder = ?, embedder_key = NULL", (embedder,))

    def rekey(self, collection: Collection, key: str) -> None:
        """The embedder's model files changed: record their key, and index everything again.

        The chunks go too, not only the vectors: they were cut with the old tokenizer.
        """
        self._reindex(collection, "embedder_key = ?", (key,))

    def recut(self, collection: Collection, chunker_version: int) -> None:
        """The chunker changed since the collection was cut: record the new version, and
        index everything again (vectors of unchanged chunk texts are reused)."""
        self._reindex(collection, "chunker_version = ?", (chunker_version,))

    def _reindex(
        self, collection: Collection, assignments: str, values: tuple[object, ...]
    ) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE collections SET {assignments}, generation = generation + 1 WHERE id = ?",
                (*values, collection.id),
            )
            conn.execute(
                "UPDATE documents SET state = 'pending', content_hash = NULL WHERE "
                "collection_id = ? AND state = 'indexed'",
                (collection.id,),
            )

    def vector_sample(self, collection: Collection, limit: int) -> list[tuple[str, bytes | None]]:
        """(text, stored vector or None) of up to ``limit`` random indexed chunks.

        The vector is whatever is stored under the collection's embedder id, whatever the
        model key it carries: the caller checks it against a fresh embedding.
        """
        rows = self.db.query(
            "SELECT c.text, e.vector FROM chunks c JOIN documents d ON d.id = c.document_id "
            "LEFT JOIN embeddings e ON e.embedder = ? AND e.text_hash = c.text_hash "
            "WHERE d.collection_id = ? AND d.state = 'indexed' ORDER BY random() LIMIT ?",
            (collection.embedder, collection.id, limit),
        )
        return [(r[0], r[1]) for r in rows]

    def adopt_vectors(self, collection: Collection, key: str) -> None:
        """Vectors stored before content keys were checked and found to be ``key``'s: keep them."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE embeddings SET model_key = ? WHERE embedder = ? AND model_key IS NULL "
                "AND text_hash IN (SELECT c.text_hash FROM chunks c JOIN documents d "
                "ON d.id = c.document_id WHERE d.collection_id = ?)",
                (key, collection.embedder, collection.id),
            )
            conn.execute(
                "UPDATE collections SET embedder_key = ? WHERE id = ?", (key, collection.id)
            )

    def generation(self, collection_id: int) -> int:
        row = self.db.query_one("SELECT generation FROM collections WHERE id = ?", (collection_id,))
        return int(row[0]) if row else -1

    def summary(self, collection: Collection) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in self.db.query(
            "SELECT state, count(*) AS n FROM documents WHERE collection_id = ? GROUP BY state",
            (collection.id,),
        ):
            counts[row["state"]] = row["n"]
        total = self.db.query_one(
            "SELECT coalesce(sum(chunk_count), 0) FROM documents "
            "WHERE collection_id = ? AND state = 'indexed'",
            (collection.id,),
        )
        counts["chunks"] = int(total[0]) if total else 0
        counts["files"] = sum(counts[s] for s in STATES)
        return counts

    # -- sources --------------------------------------------------------------------

    def add_source(self, collection: Collection, source: Source) -> None:
        self.db.execute(
            "INSERT INTO collection_sources (collection_id, path, include, exclude) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (collection_id, path) DO UPDATE SET "
            "include = excluded.include, exclude = excluded.exclude",
            (
                collection.id,
                db_path(source.path),
                json.dumps(source.include),
                json.dumps(source.exclude),
            ),
        )

    def sources(self, collection: Collection) -> list[Source]:
        rows = self.db.query(
            "SELECT path, include, exclude FROM collection_sources WHERE collection_id = ? "
            "ORDER BY path",
            (collection.id,),
        )
        return [
            Source(
                os_path(r["path"]), tuple(json.loads(r["include"])), tuple(json.loads(r["exclude"]))
            )
            for r in rows
        ]

    # -- documents ------------------------------------------------------------------

    def documents(self, collection: Collection) -> list[Document]:
        rows = self.db.query(
            "SELECT * FROM documents WHERE collection_id = ? ORDER BY path", (collection.id,)
        )
        return [_document(r) for r in rows]

    def mark_pending(self, collection: Collection, paths: Sequence[str]) -> None:
        """Record new or changed files as waiting to be indexed (one transaction)."""
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO documents (collection_id, path, state, updated_at) "
                "VALUES (?, ?, 'pending', ?) ON CONFLICT (collection_id, path) DO UPDATE SET "
                "state = 'pending', error = NULL, updated_at = excluded.updated_at",
                [(collection.id, db_path(p), _now()) for p in paths],
            )

    def record_missing(self, collection: Collection, path: str) -> None:
        """A source file that does not exist: failed, without chunks (one transaction)."""
        value = db_path(path)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO documents (collection_id, path, state, error, updated_at) "
                "VALUES (?, ?, 'failed', 'no such file or folder', ?) "
                "ON CONFLICT (collection_id, path) DO UPDATE SET state = 'failed', "
                "error = excluded.error, content_hash = NULL, chunk_count = 0, "
                "updated_at = excluded.updated_at",
                (collection.id, value, _now()),
            )
            conn.execute(
                "DELETE FROM chunks WHERE document_id = "
                "(SELECT id FROM documents WHERE collection_id = ? AND path = ?)",
                (collection.id, value),
            )
            conn.execute(
                "UPDATE collections SET generation = generation + 1 WHERE id = ?",
                (collection.id,),
            )

    def touch(self, document_id: int, size: int, mtime_ns: int) -> None:
        """A file whose metadata changed but whose content did not."""
        self.db.execute(
            "UPDATE documents SET size = ?, mtime_ns = ?, state = 'indexed', updated_at = ? "
            "WHERE id = ?",
            (size, mtime_ns, _now(), document_id),
        )

    def remove_documents(self, collection: Collection, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in ids])
            conn.execute(
                "UPDATE collections SET generation = generation + 1 WHERE id = ?", (collection.id,)
            )

    def finish_document(
        self,
        collection: Collection,
        document_id: int,
        *,
        state: str,
        error: str | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        content_hash: str | None = None,
        pages: int | None = None,
    ) -> None:
        """Close a document's indexing: its state, numbers, and a new collection generation."""
        error = None if error is None else safe_text(error)
        with self.db.transaction() as conn:
            count = conn.execute(
                "SELECT count(*) FROM chunks WHERE document_id = ?", (document_id,)
            ).fetchone()[0]
            conn.execute(
                "UPDATE documents SET state = ?, error = ?, size = ?, mtime_ns = ?, "
                "content_hash = ?, chunk_count = ?, pages = ?, updated_at = ? WHERE id = ?",
                (state, error, size, mtime_ns, content_hash, count, pages, _now(), document_id),
            )
            conn.execute(
                "UPDATE collections SET generation = generation + 1 WHERE id = ?", (collection.id,)
            )

    # -- chunks and vectors ---------------------------------------------------------

    def clear_chunks(self, document_id: int) -> None:
        """Drop a document's chunks and forget its content hash, together.

        The hash says "these chunks are complete for this content"; keeping it beside
        partial chunks would let a later run take them for finished.
        """
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
            conn.execute(
                "UPDATE documents SET content_hash = NULL, chunk_count = 0 WHERE id = ?",
                (document_id,),
            )

    # Vectors are stored under the embedder's id (as before content keys) and carry the
    # content key of the model files that made them: a vector counts only when its key is
    # the model's current one, so replacing the model in a folder can never serve stale
    # vectors (or vectors of another dimension), and a re-embedded text replaces its row.

    def missing_vectors(self, embedder: str, key: str, hashes: Sequence[str]) -> set[str]:
        """Which of ``hashes`` have no stored vector made by ``embedder``'s model ``key``."""
        found: set[str] = set()
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            part = unique[start : start + 500]
            rows = self.db.query(
                f"SELECT text_hash FROM embeddings WHERE embedder = ? AND model_key = ? "
                f"AND text_hash IN ({','.join('?' * len(part))})",
                (embedder, key, *part),
            )
            found.update(r[0] for r in rows)
        return set(unique) - found

    def write_chunks(
        self,
        embedder: str,
        key: str,
        groups: Sequence[tuple[int, Sequence[NewChunk]]],
        vectors: dict[str, np.ndarray],
    ) -> None:
        """Store chunks of one or more documents, (document id, chunks) each, and the vectors
        computed for them, in one transaction."""
        import numpy as np

        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO embeddings (embedder, text_hash, vector, model_key) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (embedder, text_hash) DO UPDATE SET "
                "vector = excluded.vector, model_key = excluded.model_key",
                [(embedder, h, v.astype(np.float16).tobytes(), key) for h, v in vectors.items()],
            )
            conn.executemany(
                "INSERT INTO chunks (document_id, ordinal, text, page, line_start, line_end, "
                "heading, text_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        document_id,
                        c.ordinal,
                        c.text,
                        c.page,
                        c.line_start,
                        c.line_end,
                        c.heading,
                        c.text_hash,
                    )
                    for document_id, chunks in groups
                    for c in chunks
                ],
            )
