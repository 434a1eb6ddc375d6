"""Indexing a collection: incremental, resumable after a kill at any moment, cancellable.

SQLite is the source of truth and every step commits before the next starts:

1. the sources are scanned; files that are new, changed (size or mtime) or left pending
   by an earlier run are marked ``pending`` in one transaction, and documents whose
   files are gone are deleted (their chunks go with them);
2. each pending document is processed alone: its old chunks and content hash are
   cleared, its chunks are written in batches as they are embedded, and only the last
   transaction marks it ``indexed`` (or ``failed`` / ``skipped`` with the reason).

A kill at any moment leaves each document either finished or ``pending``; the next run
clears a pending document's partial chunks and does it again, so the result is exactly
what a clean run produces. Vectors are stored by chunk-text hash, so text that was
already embedded (an earlier attempt, a duplicate file) is not embedded again.

Documents are read (stat, hash, parse, cut) on a thread of their own, ahead of the
embedding (``reading.Reader``); chunks of several small documents are embedded in one batch,
and each document is still finished alone, in order, after its last chunk is written.

Whatever goes wrong while one document is read, cut or embedded fails that document
alone (state ``failed``, a plain reason) and the run goes on: parsers are large libraries
that raise every kind of exception on odd files (python-docx a ``ValueError`` quoting the
file on a table cell's span that is not a number, ``HTMLParser`` an ``AssertionError``
quoting the page on ``<![ ``). Only the user's cancel and faults of the machine
(``EnvironmentFault``: a full disk, a busy database) stop the run; the document then stays
``pending`` for the next one. Parser faults are logged by type and place, never by
message: their messages quote the document.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BastionError, Cancelled, EnvironmentFault
from engine.jobs import JobContext
from engine.rag.collections import Collection, CollectionStore, Document, NewChunk
from engine.rag.reading import (
    BATCH,
    Begin,
    Chunks,
    End,
    Reader,
    embedded_text,
    fault_reason,
    fault_summary,
)
from engine.rag.scanner import FoundFile, identities, scan, shown_path

log = logging.getLogger(__name__)

_CHANGED = "the file changed while it was being indexed; sync again later"
# Texts per model call when a flush of ``BATCH`` chunks is embedded. The embedder sorts the
# flush by length first, so small calls pad little: on the gnuplot manual (652 small HTML
# pages) calls of 16 indexed in 22.4 s, calls of 64 in 25-26 s (2-core AMD EPYC).
EMBED_BATCH = 16


@dataclass
class IndexReport:
    """What one run did. ``to_public`` is the contract's ``collections add|sync`` output."""

    indexed: int = 0
    skipped: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing_sources: list[str] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0

    def to_public(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "chunks": self.chunks,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "missing_sources": self.missing_sources,
            "cancelled": self.cancelled,
            "seconds": round(self.seconds, 3),
        }


class Indexer:
    """Runs indexing jobs for collections of one database."""

    def __init__(
        self,
        store: CollectionStore,
        embedder_for: Callable[[str], Any],
        protected: Callable[[], Sequence[Path]] = lambda: (),
    ) -> None:
        """An indexer over ``store``.

        Args:
            store: the collection tables.
            embedder_for: the loaded embedder of an embedder id.
            protected: the folders never to scan (Bastion's home, caches, environment),
                asked for at every run.
        """
        self._store = store
        self._embedder_for = embedder_for
        self._protected = protected

    def run(self, collection: Collection, ctx: JobContext) -> IndexReport:
        """Bring ``collection`` up to date with its sources; see the module docstring."""
        started = time.monotonic()
        report = IndexReport()
        try:
            pending = self._plan(collection, report)
            self._process_all(collection, pending, report, ctx)
        except Cancelled:
            report.cancelled = True
            log.info("indexing of %s cancelled; committed work is kept", collection.name)
        report.seconds = time.monotonic() - started
        return report

    def _plan(self, collection: Collection, report: IndexReport) -> list[Document]:
        found: dict[str, FoundFile] = {}
        live_roots: list[str] = []
        missing_files: list[str] = []
        # Keyed by OS path, as the scan names files (see scanner.db_path).
        existing = {d.os_path: d for d in self._store.documents(collection)}
        protected = identities(self._protected())
        for source in self._store.sources(collection):
            root = Path(source.path)
            if not root.exists():
                prefix = source.path.rstrip(os.sep) + os.sep
                if any(p.startswith(prefix) for p in existing):
                    # A folder that is gone (an unmounted drive, a renamed share): keep its
                    # documents rather than drop hours of indexing; say so.
                    report.missing_sources.append(shown_path(source.path))
                else:
                    missing_files.append(source.path)
                continue
            live_roots.append(source.path)
            for f in scan(source, protected):
                found[f.path] = f

        def under_live_root(path: str) -> bool:
            return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in live_roots)

        gone = [d.id for p, d in existing.items() if p not in found and under_live_root(p)]
        self._store.remove_documents(collection, gone)
        report.removed = len(gone)
        # A file named directly that does not exist (never did, or was deleted): it stays in
        # the collection as failed, without chunks, so `status` shows why it is not searchable.
        for path in missing_files:
            if path not in existing or existing[path].state != "failed":
                self._store.record_missing(collection, path)
            report.failed.append((shown_path(path), "no such file or folder"))

        todo = []
        for path, f in found.items():
            doc = existing.get(path)
            if (
                doc is None
                or doc.state == "pending"
                or doc.size != f.size
                or doc.mtime_ns != f.mtime_ns
            ):
                todo.append(path)
            else:
                report.unchanged += 1
        self._store.mark_pending(collection, sorted(todo))
        wanted = set(todo)
        return [d for d in self._store.documents(collection) if d.os_path in wanted]

    def _process_all(
        self, collection: Collection, pending: list[Document], report: IndexReport, ctx: JobContext
    ) -> None:
        if collection.embedder_key is None:  # Documents.sync records it before every run
            raise RuntimeError(f"collection {collection.name!r} has no embedder content key")
        run = _Run(self._store, collection, self._embedder_for(collection.embedder), report, ctx)
        run.progress(len(pending), "scanning done")
        changed = run.index(pending)
        if changed:  # read once more; a file that changes again fails with a reason
            for doc in run.index(changed):
                self._store.finish_document(collection, doc.id, state="failed", error=_CHANGED)
                report.failed.append((doc.path, _CHANGED))
                run.done_one(doc)
        run.progress(len(pending), f"done · {report.chunks} chunks", finished=True)


@dataclass
class _Written:
    """A document begun in this run: how much of it is written."""

    chunks: int = 0
    pages: set[int] = field(default_factory=set)


class _Run:
    """One indexing run on the indexer's thread: takes the reader's events, embeds chunks in
    full batches across documents, writes them, and finishes each document in order."""

    def __init__(
        self,
        store: CollectionStore,
        collection: Collection,
        embedder: Any,
        report: IndexReport,
        ctx: JobContext,
    ) -> None:
        self.store, self.collection, self.embedder = store, collection, embedder
        self.report, self.ctx = report, ctx
        self.key = str(collection.embedder_key)
        self.started = time.monotonic()
        self.done = 0
        self.total = 0
        self.buffer: list[tuple[Document, NewChunk]] = []  # chunks waiting for vectors
        self.waiting: list[End] = []  # verdicts waiting for their chunks to be written
        self.written: dict[int, _Written] = {}

    def progress(self, total: int, label: str, *, finished: bool = False) -> None:
        self.total = total
        self.ctx.report(total if finished else self.done, total, label)

    def done_one(self, doc: Document) -> None:
        self.done += 1
        name = os.path.basename(doc.path)  # the shown path: labels reach the GUI
        elapsed = time.monotonic() - self.started
        rate = f", {self.report.chunks / elapsed:.0f} chunks/s" if elapsed > 1 else ""
        self.ctx.report(
            min(self.done, self.total), self.total, f"{name} · {self.report.chunks} chunks{rate}"
        )

    def index(self, docs: list[Document]) -> list[Document]:
        """Index ``docs``; the ones that changed while they were read are returned."""
        changed: list[Document] = []
        with Reader(docs, self.embedder.count_tokens, self.ctx) as reader:
            for event in reader.events():
                self.ctx.check_cancelled()
                if isinstance(event, Begin):
                    self.store.clear_chunks(event.doc.id)
                    self.written[event.doc.id] = _Written()
                elif isinstance(event, Chunks):
                    self.buffer.extend((event.doc, c) for c in event.chunks)
                    if len(self.buffer) >= BATCH:
                        self.flush()
                elif event.state == "indexed" and any(d.id == event.doc.id for d, _ in self.buffer):
                    # Finished with the next flush: at BATCH chunks, or at the end of a
                    # document once EMBED_BATCH chunks wait. Never on timing: int8 vectors
                    # depend a little on what they are batched with, so batches fixed by the
                    # documents alone keep indexing reproducible.
                    self.waiting.append(event)
                    if len(self.buffer) >= EMBED_BATCH:
                        self.flush()
                else:
                    if event.state == "changed":
                        changed.append(event.doc)
                    self.finish(event)
            self.flush()
        return changed

    def flush(self) -> None:
        """Embed the buffered chunks in one batch, write them, finish the waiting documents."""
        if self.buffer:
            store, collection = self.store, self.collection
            missing = store.missing_vectors(
                collection.embedder, self.key, [c.text_hash for _, c in self.buffer]
            )
            to_embed = list(
                {c.text_hash: c for _, c in self.buffer if c.text_hash in missing}.values()
            )
            groups: dict[int, list[NewChunk]] = {}
            for doc, chunk in self.buffer:
                groups.setdefault(doc.id, []).append(chunk)
            vectors = {}
            if to_embed:
                try:
                    matrix = self.embedder.encode(
                        [embedded_text(c.text, c.heading) for c in to_embed],
                        batch_size=EMBED_BATCH,
                        check_cancelled=self.ctx.check_cancelled,
                    )
                except (Cancelled, EnvironmentFault):
                    raise
                except Exception as exc:  # the embedder's own fault fails these documents
                    self._fail_batch(exc)
                    return
                vectors = {c.text_hash: matrix[i] for i, c in enumerate(to_embed)}
            store.write_chunks(collection.embedder, self.key, list(groups.items()), vectors)
            for doc_id, chunks in groups.items():
                written = self.written[doc_id]
                written.chunks += len(chunks)
                written.pages.update(c.page for c in chunks if c.page is not None)
            self.buffer.clear()
        for end in self.waiting:
            self.finish(end)
        self.waiting.clear()

    def _fail_batch(self, exc: Exception) -> None:
        """Fail every document with chunks in the buffer: the batch could not be embedded."""
        log.warning("a batch of chunks could not be embedded: %s", fault_summary(exc))
        reason = exc.message if isinstance(exc, BastionError) else fault_reason(exc, None)
        docs = {doc.id: doc for doc, _ in self.buffer}
        self.buffer.clear()
        self.waiting = [end for end in self.waiting if end.doc.id not in docs]
        for doc in docs.values():
            # Not the document's fault: no size and time kept, so the next sync tries again.
            self.finish(End(doc, "failed", None, reason))
        for end in self.waiting:
            self.finish(end)
        self.waiting.clear()

    def finish(self, end: End) -> None:
        """Record the reader's verdict on a document whose chunks are all written."""
        doc, store, collection, report = end.doc, self.store, self.collection, self.report
        before = end.before
        size = None if before is None else before.st_size
        mtime_ns = None if before is None else before.st_mtime_ns
        if end.state != "indexed" and doc.id in self.written:
            self.buffer = [(d, c) for d, c in self.buffer if d.id != doc.id]
            store.clear_chunks(doc.id)  # partial chunks of a document that failed midway
        written = self.written.pop(doc.id, _Written())
        if end.state == "changed":
            return  # read again by the caller; counted then
        if end.state == "unchanged":
            assert before is not None
            store.touch(doc.id, before.st_size, before.st_mtime_ns)
            report.unchanged += 1
        elif end.state == "indexed" and written.chunks:
            store.finish_document(
                collection,
                doc.id,
                state="indexed",
                size=size,
                mtime_ns=mtime_ns,
                content_hash=end.content_hash,
                pages=len(written.pages) or None,
            )
            report.indexed += 1
            report.chunks += written.chunks
        else:
            state = "skipped" if end.state == "indexed" else end.state
            error = "no text" if end.state == "indexed" else end.error
            store.finish_document(
                collection,
                doc.id,
                state=state,
                error=error,
                size=size,
                mtime_ns=mtime_ns,
                content_hash=end.content_hash,
            )
            if state == "failed":
                report.failed.append((doc.path, str(error)))
            else:
                report.skipped += 1
        self.done_one(doc)
