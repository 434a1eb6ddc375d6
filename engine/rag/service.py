"""The documents area as the engine facade uses it: collections, indexing, search, grounding."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.jobs import JobContext
from engine.rag.collections import Collection, CollectionStore, Document, Source
from engine.rag.grounding import Grounding, ground
from engine.rag.indexer import Indexer, IndexReport
from engine.rag.retrieval import Retriever, SearchResult
from engine.store.db import Database

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
# What ``source_text`` returns of a text file at most: a window of lines around the one
# asked for, so a 200 MB log opens as fast as a note (the viewer says it is a window).
SOURCE_WINDOW_LINES = 4000
SOURCE_MAX_CHARS = 2_000_000


@dataclass(frozen=True)
class SourceText:
    """A stretch of a document's text, as a viewer shows it next to a citation.

    ``first_line`` is the file line that ``text`` starts on (text-like files; 1 when the
    text starts at the top); ``page`` and ``pages`` are set for PDFs (1-based page shown,
    page count). ``truncated`` says the text is a window of a larger document.
    """

    path: str
    kind: str
    text: str
    page: int | None = None
    pages: int | None = None
    first_line: int = 1
    truncated: bool = False


class Documents:
    """Owns the collection tables, the indexer, the retriever and the loaded embedders."""

    def __init__(self, db: Database, home: Path) -> None:
        self.store = CollectionStore(db)
        self._home = home
        self._indexer = Indexer(self.store, self.embedder)
        self._retriever = Retriever(self.store, home, self.embedder)

    def embedder(self, model_id: str) -> Any:
        """The embedder for ``model_id``, loaded once per process (see embedder.py)."""
        from engine.rag.embedder import get_embedder

        return get_embedder(model_id, cache_dir=self._home / "cache" / "embedders")

    @staticmethod
    def check_embedder_id(model_id: str) -> str:
        """Accept the default id or a local sentence-transformers folder, without loading it."""
        if model_id == DEFAULT_EMBEDDER:
            return model_id
        folder = Path(model_id).expanduser()
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise InvalidInput(
                f"unknown embedder {model_id!r}",
                hint=f"use {DEFAULT_EMBEDDER} or the path of a local sentence-transformers folder",
            )
        return str(folder.resolve())

    # -- collections ------------------------------------------------------------------

    def create(self, name: str, embedder: str | None = None) -> Collection:
        collection = self.store.create(name, self.check_embedder_id(embedder or DEFAULT_EMBEDDER))
        (self._home / "collections" / str(collection.id)).mkdir(parents=True, exist_ok=True)
        return collection

    def get(self, name: str) -> Collection:
        return self.store.get(name)

    def all(self) -> list[tuple[Collection, dict[str, int]]]:
        return [(c, self.store.summary(c)) for c in self.store.all()]

    def status(self, name: str) -> tuple[Collection, dict[str, int], list[Document]]:
        collection = self.store.get(name)
        return collection, self.store.summary(collection), self.store.documents(collection)

    def remove(self, name: str) -> Collection:
        import shutil

        collection = self.store.get(name)
        self.store.remove(collection)
        self._retriever.forget(collection)
        shutil.rmtree(self._home / "collections" / str(collection.id), ignore_errors=True)
        return collection

    def add(
        self,
        name: str,
        paths: Sequence[str],
        ctx: JobContext,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> IndexReport:
        """Add files or folders to a collection and index what is new or changed."""
        if not paths:
            raise InvalidInput("give at least one file or folder to add")
        collection = self.store.get(name)
        for raw in paths:
            path = os.path.abspath(os.path.expanduser(raw))
            self.store.add_source(collection, Source(path, tuple(include), tuple(exclude)))
        return self.sync(name, ctx)

    def sync(self, name: str, ctx: JobContext) -> IndexReport:
        """Re-index what changed in a collection's sources and drop what was deleted."""
        collection = self.store.get(name)
        report = self._indexer.run(collection, ctx)
        if not report.cancelled:
            self._retriever.refresh(self.store.get(name))
        return report

    def set_embedder(self, name: str, embedder: str, ctx: JobContext) -> IndexReport:
        """Switch a collection to another embedder and re-embed everything with it."""
        collection = self.store.get(name)
        model_id = self.check_embedder_id(embedder)
        if model_id != collection.embedder:
            self.store.set_embedder(collection, model_id)
            self._retriever.forget(collection)
        return self.sync(name, ctx)

    @staticmethod
    def source_text(path: str, page: int | None = None, line: int | None = None) -> SourceText:
        """The text of a document as a source viewer shows it (read-only; no database).

        A PDF gives the text of one page (``page``, default 1), read as the indexer reads
        it, so a citation's snippet is found in it. A text-like file (text, code, Markdown,
        HTML source) gives its lines as the indexer numbers them, decoded the same way; a
        large one gives a window of lines around ``line``. Word files give their text.

        Raises:
            NotFound: the file does not exist (moved or deleted since it was indexed).
            InvalidInput: ``page`` is outside the PDF.
            DocumentError: the file cannot be read (unsupported, binary, corrupt PDF).
        """
        from engine.errors import NotFound
        from engine.rag.loaders import DocumentError, detect_kind, load_document

        file = Path(path)
        if not file.is_file():
            raise NotFound(f"file not found: {path}", hint="it was moved or deleted")
        kind = detect_kind(file)
        if kind is None:
            raise DocumentError(f"unsupported file type ({file.suffix or 'no extension'})")
        try:
            if kind == "pdf":
                return _pdf_page(path, page or 1)
            if kind == "docx":
                text = "\n\n".join(s.text for s in load_document(file))
                return SourceText(path, kind, text[:SOURCE_MAX_CHARS])
            return _text_window(path, kind, line or 1)
        except OSError as exc:
            raise DocumentError(f"cannot read: {(exc.strerror or str(exc)).lower()}") from exc

    # -- search and answers -----------------------------------------------------------

    def search(self, name: str, query: str, k: int = 5, mode: str = "hybrid") -> list[SearchResult]:
        return self._retriever.search(self.store.get(name), query, k, mode)

    def evaluate(self, name: str, qa_path: Path) -> dict[str, Any]:
        """Retrieval quality on questions with known sources (see evaluation.py)."""
        from engine.rag.evaluation import evaluate, read_qa

        questions = read_qa(qa_path)
        collection = self.store.get(name)

        def count(q: Any) -> int:
            return self.store.count_chunks_of(collection, q.file, q.page)

        metrics = evaluate(
            questions,
            lambda text, k, mode: self._retriever.search(collection, text, k, mode),
            count,
        )
        return {**metrics, "questions": len(questions)}

    def ground(self, name: str, question: str, k: int) -> Grounding:
        """Retrieve for a question and decide how it may be answered."""
        collection = self.store.get(name)
        summary = self.store.summary(collection)
        results = self._retriever.search(collection, question, k) if summary["indexed"] else []
        return ground(collection.name, question, results, summary)


def _pdf_page(path: str, page: int) -> SourceText:
    """One page of a PDF, extracted and cleaned as ``loaders`` does for indexing."""
    from pypdf import PasswordType, PdfReader

    from engine.rag.loaders import DocumentError
    from engine.rag.textio import CONTROL_CHARS

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise DocumentError("encrypted PDF: Bastion cannot read it without the password")
        pages = len(reader.pages)
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many types on damage, as in loaders
        raise DocumentError(f"corrupt PDF: {type(exc).__name__}") from exc
    if not 1 <= page <= pages:
        raise InvalidInput(f"page {page} is outside the PDF (1–{pages})")
    try:
        text = reader.pages[page - 1].extract_text()
    except Exception as exc:
        raise DocumentError(f"page {page} cannot be read: {type(exc).__name__}") from exc
    text = CONTROL_CHARS.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    return SourceText(path, "pdf", text.strip("\n"), page, pages)


def _text_window(path: str, kind: str, line: int) -> SourceText:
    """Lines of a text-like file around ``line``, numbered and decoded as the indexer does."""
    from engine.rag.loaders import DocumentError
    from engine.rag.textio import open_text, text_blocks

    first = max(1, line - SOURCE_WINDOW_LINES // 2)
    kept: list[str] = []
    size = 0
    truncated = first > 1
    with open(path, "rb") as raw:
        reader = open_text(raw)
        if reader is None:
            raise DocumentError("binary data, not text")
        for number, block in text_blocks(reader, lambda: None):
            lines = block.split("\n")
            if number + len(lines) <= first:
                continue
            lines = lines[max(0, first - number) :]
            room = SOURCE_WINDOW_LINES - len(kept)
            kept.extend(lines[:room])
            size += sum(len(x) + 1 for x in lines[:room])
            if len(lines) > room or size > SOURCE_MAX_CHARS:
                truncated = True
                break
    return SourceText(path, kind, "\n".join(kept), first_line=first, truncated=truncated)
