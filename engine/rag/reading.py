"""Reading documents for the indexer: stat, hash, parse and cut, on a thread of its own.

The indexer's main thread embeds and writes; a ``Reader`` thread reads the documents ahead
of it and hands over what it found as ``Event``s through a bounded queue, so parsing (pure
Python for HTML, PDFium for PDFs) overlaps with embedding (native code that releases the
GIL), and small documents are embedded together in full batches. The reader never touches
the database: every write stays on the indexer's thread.

For each document the reader sends either one ``End`` (nothing to index: unchanged,
unsupported, unreadable), or ``Begin``, then its chunks in ``Chunks`` of up to ``BATCH``,
then ``End`` with the verdict (indexed, a document error with its reason, or changed
while it was read). Whatever goes wrong while one document is read fails that document
alone (see the indexer's module docstring); a cancel or a fault of the machine stops the
reader and is raised again on the indexer's thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BastionError, Cancelled, EnvironmentFault
from engine.jobs import JobContext
from engine.rag.collections import Document, NewChunk, safe_text
from engine.rag.scanner import shown_path

log = logging.getLogger(__name__)

BATCH = 64  # chunks embedded and committed together
# Events the reader may run ahead by (each a few documents' worth of small files, or
# BATCH chunks of a large one): bounds the memory held while embedding lags.
AHEAD = 32
_HASH_BLOCK = 1 << 20


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


# -- what the reader says --------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """The document is read afresh: its old chunks go."""

    doc: Document


@dataclass(frozen=True)
class Chunks:
    doc: Document
    chunks: list[NewChunk]


@dataclass(frozen=True)
class End:
    """The reader's verdict on a document.

    ``state``: ``indexed`` (all its chunks were sent; none means "no text"), ``unchanged``
    (same content: only its size and time are updated), ``skipped`` or ``failed`` (with
    ``error``), or ``changed`` (the file changed while it was read: read it again).
    ``before``: the file's stat when reading began; None where the failure should be
    retried by the next run whatever the file's size and time.
    """

    doc: Document
    state: str
    before: os.stat_result | None = None
    error: str | None = None
    content_hash: str | None = None


@dataclass(frozen=True)
class Stop:
    """The reader stopped: a cancel or a fault of the machine, raised again by the indexer."""

    error: BaseException


Event = Begin | Chunks | End | Stop


def _cannot_read(exc: OSError) -> str:
    return f"cannot read: {(exc.strerror or str(exc)).lower()}"


def read_document(
    doc: Document, count_tokens: Callable[[list[str]], list[int]], ctx: JobContext
) -> Iterator[Event]:
    """What the indexer needs of one pending document, as events (see the module docstring)."""
    from engine.rag.chunking import chunk_sections
    from engine.rag.loaders import DocumentError, detect_kind, load_document

    path = doc.os_path
    try:
        before = os.stat(path)
    except OSError as exc:
        yield End(doc, "failed", error=_cannot_read(exc))
        return
    kind = detect_kind(Path(path))
    if kind is None:
        ext = shown_path(Path(path).suffix) or "no extension"
        yield End(doc, "skipped", before, f"unsupported file type ({ext})")
        return
    try:
        content_hash = _sha256(path, ctx)
    except OSError as exc:
        yield End(doc, "failed", error=_cannot_read(exc))
        return
    if doc.content_hash == content_hash and doc.chunk_count > 0:
        yield End(doc, "unchanged", before)  # renamed or touched
        return
    yield Begin(doc)
    try:
        sections = _guarded(lambda: load_document(Path(path), ctx.check_cancelled))
        for batch in _batched(chunk_sections(sections, count_tokens), BATCH):
            new = []
            for c in batch:
                # A parser can hand over lone surrogates (a broken PDF text map); SQLite
                # and the hash refuse them.
                text = safe_text(c.text)
                heading = None if c.heading is None else safe_text(c.heading)
                # Vectors are kept by what was embedded: text and heading path.
                text_hash = _chunk_hash(embedded_text(text, heading))
                new.append(
                    NewChunk(c.ordinal, text, c.page, c.line_start, c.line_end, heading, text_hash)
                )
            yield Chunks(doc, new)
    except DocumentError as exc:
        yield End(doc, exc.state, before, exc.message)
        return
    except (Cancelled, EnvironmentFault):
        raise  # the user's cancel, or the machine's fault: the document stays pending
    except BastionError as exc:  # Bastion's own errors carry a message safe to show
        yield End(doc, "failed", error=exc.message)
        return
    except OSError as exc:
        yield End(doc, "failed", error=_cannot_read(exc))
        return
    except BaseException as exc:  # see the indexer's module docstring
        if isinstance(exc, _NOT_A_DOCUMENT_FAULT):
            raise
        parser = isinstance(exc, _ReaderFault) and exc.__cause__ is not None
        fault = exc.__cause__ if parser and exc.__cause__ is not None else exc
        log.warning("%r could not be indexed: %s", path, fault_summary(fault))
        yield End(doc, "failed", before, fault_reason(fault, kind if parser else None))
        return
    try:
        after = os.stat(path)
    except OSError:
        after = None
    if after is None or (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ):
        yield End(doc, "changed")
        return
    yield End(doc, "indexed", before, content_hash=content_hash)


class _Stopped(Exception):
    """The indexer stopped taking events: the reader ends quietly."""


class Reader:
    """Reads ``docs`` on a thread of its own; ``events()`` hands over what it found, in order.

    Use as a context manager: leaving it (normally, on a cancel or on an error) stops the
    thread and waits for it.
    """

    def __init__(
        self,
        docs: Sequence[Document],
        count_tokens: Callable[[list[str]], list[int]],
        ctx: JobContext,
    ) -> None:
        self._docs = docs
        self._count_tokens = count_tokens
        self._ctx = ctx
        self._queue: queue.Queue[Event | None] = queue.Queue(maxsize=AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bastion-reader", daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # room for a reader blocked on a full queue
                self._queue.get(timeout=0.05)
        self._thread.join()

    def events(self) -> Iterator[Begin | Chunks | End]:
        """The events in order, until every document was read. A ``Stop`` is raised."""
        while True:
            event = self._queue.get()
            if event is None:
                return
            if isinstance(event, Stop):
                raise event.error
            yield event

    def _put(self, event: Event | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(event, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self) -> None:
        try:
            for doc in self._docs:
                for event in read_document(doc, self._count_tokens, self._ctx):
                    self._put(event)
            self._put(None)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the indexer's thread, raised there
            with contextlib.suppress(_Stopped):
                self._put(Stop(exc))
