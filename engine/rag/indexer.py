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

import hashlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BastionError, Cancelled, EnvironmentFault
from engine.jobs import JobContext
from engine.rag.collections import Collection, CollectionStore, Document, NewChunk, safe_text
from engine.rag.scanner import FoundFile, identities, scan, shown_path

log = logging.getLogger(__name__)

BATCH = 64  # chunks embedded and committed together
_HASH_BLOCK = 1 << 20


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


class _FileChanged(Exception):
    pass


class _ReaderFault(Exception):
    """An unexpected exception from a document's parser (the original is ``__cause__``)."""


# Exceptions that end the process or a generator: never a document's fault.
_NOT_A_DOCUMENT_FAULT = (KeyboardInterrupt, SystemExit, GeneratorExit)
_KIND_NAMES = {"pdf": "PDF", "docx": "DOCX", "html": "HTML", "markdown": "Markdown"}


def _where(frame: traceback.FrameSummary) -> str:
    name = frame.filename.replace(os.sep, "/")
    for marker in ("/site-packages/", "/engine/"):
        if marker in name:
            cut = name.rindex(marker) + (1 if marker == "/engine/" else len(marker))
            name = name[cut:]
            break
    return f"{name}:{frame.lineno} in {frame.name}"


def fault_summary(exc: BaseException) -> str:
    """An exception's type and where it was raised, without its message.

    For faults raised while reading user data: a parser's message can quote the document
    (``HTMLParser``'s ``AssertionError`` does), and document text never goes to the log.
    The innermost frame and the innermost frame of Bastion's own code are named.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    text = type(exc).__name__
    if frames:
        text += f" at {_where(frames[-1])}"
        own = [f for f in frames if "/engine/" in f.filename.replace(os.sep, "/")]
        if own and own[-1] is not frames[-1]:
            text += f" (called from {_where(own[-1])})"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        text += f"; while handling {type(cause).__name__}"
    return text


def fault_reason(fault: BaseException, kind: str | None) -> str:
    """The plain reason shown for a document that an unexpected exception failed.

    Args:
        fault: the exception (its message is never used: it can quote the document).
        kind: the document's kind when its parser raised ``fault``; None for a later step.
    """
    name = type(fault).__name__
    if isinstance(fault, MemoryError):
        return f"not enough memory to read it ({name})"
    if kind is not None:
        return f"the {_KIND_NAMES.get(kind, kind)} parser failed ({name})"
    return f"indexing failed ({name})"


def _guarded(open_sections: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """The sections of a document, with any unexpected parser exception as ``_ReaderFault``.

    ``DocumentError`` (the loaders' own verdicts), ``OSError``, ``Cancelled`` and Bastion's
    other errors pass unchanged; so do the exceptions that end a process or a generator.
    """
    try:
        yield from open_sections()
    except (BastionError, Cancelled, OSError, *_NOT_A_DOCUMENT_FAULT):
        raise
    except BaseException as exc:  # PanicException of Rust libraries is a BaseException
        raise _ReaderFault from exc


def _chunk_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedded_text(text: str, heading: str | None) -> str:
    """What the embedder reads for a chunk: its heading path, then its text. A passage
    deep in a section ("It accepts three values...") says what it is about only through
    the headings above it."""
    return f"{heading}\n{text}" if heading else text


def _sha256(path: str, ctx: JobContext) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
            ctx.check_cancelled()
    return digest.hexdigest()


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
        total = len(pending)
        started = time.monotonic()
        ctx.report(0, total, "scanning done")
        for done, doc in enumerate(pending):
            ctx.check_cancelled()
            name = os.path.basename(doc.path)  # the shown path: labels reach the GUI
            elapsed = time.monotonic() - started
            rate = f", {report.chunks / elapsed:.0f} chunks/s" if elapsed > 1 else ""
            ctx.report(done, total, f"{name} · {report.chunks} chunks{rate}")
            for attempt in range(2):
                try:
                    self._process(collection, doc, report, ctx)
                    break
                except _FileChanged:
                    if attempt == 1:
                        msg = "the file changed while it was being indexed; sync again later"
                        self._store.finish_document(collection, doc.id, state="failed", error=msg)
                        report.failed.append((doc.path, msg))
        ctx.report(total, total, f"done · {report.chunks} chunks")

    def _process(
        self, collection: Collection, doc: Document, report: IndexReport, ctx: JobContext
    ) -> None:
        from engine.rag.chunking import chunk_sections
        from engine.rag.loaders import DocumentError, detect_kind, load_document

        path = doc.os_path
        try:
            before = os.stat(path)
        except OSError as exc:
            self._fail(
                collection, doc, report, f"cannot read: {(exc.strerror or str(exc)).lower()}"
            )
            return
        kind = detect_kind(Path(path))
        if kind is None:
            ext = shown_path(Path(path).suffix) or "no extension"
            self._store.finish_document(
                collection,
                doc.id,
                state="skipped",
                error=f"unsupported file type ({ext})",
                size=before.st_size,
                mtime_ns=before.st_mtime_ns,
            )
            report.skipped += 1
            return
        try:
            content_hash = _sha256(path, ctx)
        except OSError as exc:
            self._fail(
                collection, doc, report, f"cannot read: {(exc.strerror or str(exc)).lower()}"
            )
            return
        if doc.content_hash == content_hash and doc.chunk_count > 0:
            self._store.touch(doc.id, before.st_size, before.st_mtime_ns)  # renamed or touched
            report.unchanged += 1
            return

        key = collection.embedder_key
        if key is None:  # Documents.sync records it before every run
            raise RuntimeError(f"collection {collection.name!r} has no embedder content key")
        embedder = self._embedder_for(collection.embedder)
        self._store.clear_chunks(doc.id)
        written = 0
        pages: set[int] = set()
        try:
            sections = _guarded(lambda: load_document(Path(path), ctx.check_cancelled))
            chunks = chunk_sections(sections, embedder.count_tokens)
            for batch in _batched(chunks, BATCH):
                new = []
                for c in batch:
                    # A parser can hand over lone surrogates (a broken PDF text map);
                    # SQLite and the hash refuse them.
                    text = safe_text(c.text)
                    heading = None if c.heading is None else safe_text(c.heading)
                    new.append(
                        NewChunk(
                            c.ordinal,
                            text,
                            c.page,
                            c.line_start,
                            c.line_end,
                            heading,
                            # Vectors are kept by what was embedded: text and heading path.
                            _chunk_hash(embedded_text(text, heading)),
                        )
                    )
                pages.update(c.page for c in new if c.page is not None)
                missing = self._store.missing_vectors(
                    collection.embedder, key, [c.text_hash for c in new]
                )
                to_embed = [c for c in new if c.text_hash in missing]
                to_embed = list({c.text_hash: c for c in to_embed}.values())
                vectors = {}
                if to_embed:
                    matrix = embedder.encode(
                        [embedded_text(c.text, c.heading) for c in to_embed],
                        check_cancelled=ctx.check_cancelled,
                    )
                    vectors = {c.text_hash: matrix[i] for i, c in enumerate(to_embed)}
                self._store.write_batch(doc.id, collection.embedder, key, new, vectors)
                written += len(new)
                ctx.check_cancelled()
        except DocumentError as exc:
            self._store.clear_chunks(doc.id)
            self._store.finish_document(
                collection,
                doc.id,
                state=exc.state,
                error=exc.message,
                size=before.st_size,
                mtime_ns=before.st_mtime_ns,
            )
            if exc.state == "failed":
                report.failed.append((doc.path, exc.message))
            else:
                report.skipped += 1
            return
        except (Cancelled, EnvironmentFault):
            raise  # the user's cancel, or the machine's fault: the document stays pending
        except BastionError as exc:  # Bastion's own errors carry a message safe to show
            self._store.clear_chunks(doc.id)
            self._fail(collection, doc, report, exc.message)
            return
        except OSError as exc:
            self._store.clear_chunks(doc.id)
            self._fail(
                collection, doc, report, f"cannot read: {(exc.strerror or str(exc)).lower()}"
            )
            return
        except BaseException as exc:  # see the module docstring
            if isinstance(exc, _NOT_A_DOCUMENT_FAULT):
                raise
            parser = isinstance(exc, _ReaderFault) and exc.__cause__ is not None
            fault = exc.__cause__ if parser and exc.__cause__ is not None else exc
            log.warning("%r could not be indexed: %s", path, fault_summary(fault))
            self._store.clear_chunks(doc.id)
            reason = fault_reason(fault, kind if parser else None)
            self._store.finish_document(
                collection,
                doc.id,
                state="failed",
                error=reason,
                size=before.st_size,
                mtime_ns=before.st_mtime_ns,
            )
            report.failed.append((doc.path, reason))
            return

        try:
            after = os.stat(path)
        except OSError:
            after = None
        if after is None or (after.st_size, after.st_mtime_ns) != (
            before.st_size,
            before.st_mtime_ns,
        ):
            self._store.clear_chunks(doc.id)
            raise _FileChanged
        if written == 0:
            self._store.finish_document(
                collection,
                doc.id,
                state="skipped",
                error="no text",
                size=before.st_size,
                mtime_ns=before.st_mtime_ns,
                content_hash=content_hash,
            )
            report.skipped += 1
            return
        self._store.finish_document(
            collection,
            doc.id,
            state="indexed",
            size=before.st_size,
            mtime_ns=before.st_mtime_ns,
            content_hash=content_hash,
            pages=len(pages) or None,
        )
        report.indexed += 1
        report.chunks += written

    def _fail(self, collection: Collection, doc: Document, report: IndexReport, msg: str) -> None:
        self._store.finish_document(collection, doc.id, state="failed", error=msg)
        report.failed.append((doc.path, msg))
