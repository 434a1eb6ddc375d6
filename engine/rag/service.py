"""The documents area as the engine facade uses it: collections, indexing, search, grounding."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BastionError, InvalidInput, OperationFailed
from engine.jobs import JobContext
from engine.rag.chunking import CHUNKER_VERSION
from engine.rag.collections import Collection, CollectionStore, Document, Source
from engine.rag.embedder import DEFAULT_EMBEDDER
from engine.rag.evaluation import RetrievalEvaluation
from engine.rag.grounding import RARE_CHUNKS, Grounding, ground, topic_words
from engine.rag.indexer import Indexer, IndexReport
from engine.rag.reading import fault_reason, fault_summary
from engine.rag.rerank import get_judge
from engine.rag.retrieval import Retriever, SearchResult
from engine.rag.scanner import identities, is_private, is_protected, path_of_shown, shown_path
from engine.store.db import Database

log = logging.getLogger(__name__)

# What ``source_text`` returns of a text file at most: a window of lines around the one
# asked for, so a 200 MB log opens as fast as a note (the viewer says it is a window).
SOURCE_WINDOW_LINES = 4000
SOURCE_MAX_CHARS = 2_000_000
# Vectors stored before content keys are kept when a sample of them points the way the
# model embeds the same texts now. The int8 and fp32 runs of one model agree to at least
# 0.98 on every probe (the export's check); another model's vectors are unrelated.
SAME_MODEL_COSINE = 0.95
_SAMPLE_CHUNKS = 16
# What Bastion keeps in its home (see ``protected_folders``).
_HOME_PARTS = ("logs", "adapters", "models", "collections", "cache")


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
    """Owns the collection tables, the indexer, the retriever and the loaded embedders.

    ``embedder_export_in_child`` runs an embedder's one-time int8 export in a child
    process (see ``get_embedder``); the desktop app asks for it.
    """

    def __init__(self, db: Database, home: Path, *, embedder_export_in_child: bool = False) -> None:
        self.store = CollectionStore(db)
        self._home = home
        self._embedder_export_in_child = embedder_export_in_child
        self._indexer = Indexer(self.store, self.embedder, self.protected_folders)
        self._retriever = Retriever(self.store, home, self.embedder)

    def embedder(self, model_id: str) -> Any:
        """The embedder for ``model_id``, loaded once per process (see ``engine.rag.embedder``)."""
        from engine.rag.embedder import get_embedder

        return get_embedder(
            model_id,
            cache_dir=self._home / "cache" / "embedders",
            export_in_child=self._embedder_export_in_child,
        )

    def protected_folders(self) -> list[Path]:
        """Folders that are never scanned, even inside an added folder.

        Bastion's home (its logs and audit log hold prompts and answers; the redaction
        reports of fine-tunes hold the personal data that redaction removed), its caches
        (embedder exports, the training cache), its models and the Python environment it
        runs in. The macOS default home lies in ``~/Library``, which users add with the
        rest of their home folder.
        """
        import platformdirs

        from engine.paths import builtin_models_dirs

        homes = [self._home, Path(platformdirs.user_data_dir("bastion", appauthor=False))]
        others = [
            self._home / "cache" / "embedders",  # often a link to a shared cache
            Path(platformdirs.user_cache_dir("bastion", appauthor=False)),
            Path(platformdirs.user_cache_dir("bastion")),
            Path(sys.prefix),
            Path(sys.exec_prefix),
            *builtin_models_dirs(),
        ]
        if os.environ.get("BASTION_TRAIN_CACHE"):
            others.append(Path(os.environ["BASTION_TRAIN_CACHE"]).expanduser())
        # A folder that holds the user's whole home (BASTION_HOME=~, a Python installed at
        # "/") would leave nothing to index: of a Bastion home, its own sub-folders are
        # protected then; anything else such is left out.
        user = Path.home().resolve()

        def holds_user_home(folder: Path) -> bool:
            resolved = folder.resolve()
            return resolved == user or resolved in user.parents

        folders: list[Path] = []
        for home in homes:
            if holds_user_home(home):
                folders.extend(home / part for part in _HOME_PARTS)
            else:
                folders.append(home)
        folders.extend(f for f in others if not holds_user_home(f))
        return folders

    def _current(self, collection: Collection, *, reindex: bool) -> Collection:
        """``collection`` with vectors of the model its embedder names now.

        The model files' content key is compared with the one the collection was indexed
        with. Vectors from before content keys are checked on a sample and kept when they
        match. Otherwise the collection must be indexed again: ``sync`` (``reindex``) marks
        every document for it; a search says so rather than use stale vectors.

        Raises:
            OperationFailed: the model changed and ``reindex`` is False.
            NotFound: the embedder's folder is gone.
        """
        from engine.rag.embedder import embedder_key

        key = embedder_key(collection.embedder)
        if collection.embedder_key == key:
            return collection
        if collection.embedder_key is None and self._vectors_agree(collection):
            self.store.adopt_vectors(collection, key)
            return self.store.get(collection.name)
        if not reindex:
            raise OperationFailed(
                f"the embedder model of collection {collection.name!r} "
                f"({shown_path(collection.embedder)}) changed since it was indexed",
                hint=f"run: bastion collections sync {collection.name} (it embeds it again)",
            )
        log.info("the embedder of collection %s changed: indexing it again", collection.name)
        self.store.rekey(collection, key)
        self._retriever.forget(collection)
        return self.store.get(collection.name)

    def _vectors_agree(self, collection: Collection) -> bool:
        """Whether stored vectors (a sample) are what the embedder makes of their texts now."""
        import numpy as np

        sample = self.store.vector_sample(collection, _SAMPLE_CHUNKS)
        if not sample:
            return True
        embedder = self.embedder(collection.embedder)
        blobs = [v for _, v in sample]
        if any(v is None or len(v) != 2 * embedder.dimension for v in blobs):
            return False  # missing, or of another dimension
        stored = np.stack([np.frombuffer(v, dtype=np.float16) for v in blobs if v is not None])
        fresh = embedder.encode([text for text, _ in sample])
        stored = stored.astype(np.float32)
        norms = np.maximum(np.linalg.norm(stored, axis=1), 1e-12)
        cosine = np.sum(stored * fresh, axis=1) / norms
        return bool(cosine.min() >= SAME_MODEL_COSINE)

    @staticmethod
    def check_embedder_id(model_id: str) -> str:
        """Accept the default id or a local sentence-transformers folder, without loading it."""
        if model_id == DEFAULT_EMBEDDER:
            return model_id
        folder = Path(model_id).expanduser()
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise InvalidInput(
                f"unknown embedder {shown_path(model_id)!r}",
                hint=f"use {DEFAULT_EMBEDDER} or the path of a local sentence-transformers folder",
            )
        resolved = str(folder.resolve())
        if shown_path(resolved) != resolved:  # the id is stored as text and shown everywhere
            raise InvalidInput(
                f"the embedder folder {shown_path(resolved)} has a name that is not UTF-8",
                hint="rename the folder (or link to it from a UTF-8 name) and use that",
            )
        return resolved

    # -- collections ------------------------------------------------------------------

    def create(self, name: str, embedder: str | None = None) -> Collection:
        embedder = self.check_embedder_id(embedder or DEFAULT_EMBEDDER)
        collection = self.store.create(name, embedder, CHUNKER_VERSION)
        (self._home / "collections" / str(collection.id)).mkdir(parents=True, exist_ok=True)
        return collection

    def get(self, name: str) -> Collection:
        return self.store.get(name)

    def summary(self, collection: Collection) -> dict[str, int]:
        """How many files are in each state, chunks, and ``outdated``: 1 when the collection
        was cut into chunks by an older chunker (its next sync cuts it again), else 0."""
        summary = self.store.summary(collection)
        summary["outdated"] = int(collection.chunker_version != CHUNKER_VERSION)
        return summary

    def all(self) -> list[tuple[Collection, dict[str, int]]]:
        return [(c, self.summary(c)) for c in self.store.all()]

    def status(self, name: str) -> tuple[Collection, dict[str, int], list[Document]]:
        collection = self.store.get(name)
        return collection, self.summary(collection), self.store.documents(collection)

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
        protected = identities(self.protected_folders())
        absolute = [os.path.abspath(os.path.expanduser(raw)) for raw in paths]
        for path in absolute:
            if is_protected(path, protected) or is_private(os.path.basename(path)):
                raise InvalidInput(
                    f"{shown_path(path)} is Bastion's own data (its home, a cache, a redaction "
                    "report or its Python environment); it is never indexed",
                    hint="add your own files and folders",
                )
        for path in absolute:
            self.store.add_source(collection, Source(path, tuple(include), tuple(exclude)))
        return self.sync(name, ctx)

    def sync(self, name: str, ctx: JobContext) -> IndexReport:
        """Re-index what changed in a collection's sources and drop what was deleted.

        Everything is indexed again when the embedder's model changed, or when the
        collection was cut into chunks by an older chunker (``CHUNKER_VERSION``).
        """
        collection = self._current(self.store.get(name), reindex=True)
        if collection.chunker_version != CHUNKER_VERSION:
            log.info(
                "collection %s was cut into chunks by an older Bastion (chunker %s, now %d): "
                "indexing it again",
                collection.name,
                collection.chunker_version or 1,
                CHUNKER_VERSION,
            )
            self.store.recut(collection, CHUNKER_VERSION)
            self._retriever.forget(collection)
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

        ``path`` is a path as the engine shows it (a citation's); names that are not UTF-8
        are found from it (see ``scanner.path_of_shown``).

        Raises:
            NotFound: the file does not exist (moved or deleted since it was indexed).
            InvalidInput: ``page`` is outside the PDF.
            DocumentError: the file cannot be read (unsupported, binary, corrupt, or its
                parser failed on it).
        """
        from engine.errors import NotFound
        from engine.rag.loaders import DocumentError, detect_kind, load_document

        shown = shown_path(path)
        real = path_of_shown(path)
        file = Path(real)
        if not file.is_file():
            raise NotFound(f"file not found: {shown}", hint="it was moved or deleted")
        kind = detect_kind(file)
        if kind is None:
            suffix = shown_path(file.suffix) or "no extension"
            raise DocumentError(f"unsupported file type ({suffix})")
        try:
            if kind == "pdf":
                source = _pdf_page(real, page or 1)
            elif kind == "docx":
                text = "\n\n".join(s.text for s in load_document(file))
                source = SourceText(real, kind, text[:SOURCE_MAX_CHARS])
            else:
                source = _text_window(real, kind, line or 1)
        except OSError as exc:
            raise DocumentError(f"cannot read: {(exc.strerror or str(exc)).lower()}") from exc
        except BastionError:
            raise
        except Exception as exc:  # a parser's own fault on this file; see indexer.py
            log.warning("%r could not be read for viewing: %s", real, fault_summary(exc))
            raise DocumentError(fault_reason(exc, kind)) from exc
        return dataclasses.replace(source, path=shown)

    # -- search and answers -----------------------------------------------------------

    def search(self, name: str, query: str, k: int = 5, mode: str = "hybrid") -> list[SearchResult]:
        collection = self.store.get(name)
        if mode != "keyword":  # keyword search uses no vectors
            collection = self._current(collection, reindex=False)
        return self._retriever.search(collection, query, k, mode)

    def evaluate(self, name: str, qa_path: Path) -> RetrievalEvaluation:
        """Retrieval quality on questions with known sources (see evaluation.py)."""
        from engine.rag.evaluation import evaluate, read_qa

        questions = read_qa(qa_path)
        collection = self._current(self.store.get(name), reindex=False)
        metrics = evaluate(
            questions, lambda text, k, mode: self._retriever.search(collection, text, k, mode)
        )
        return RetrievalEvaluation(len(questions), metrics)

    def ground(self, name: str, question: str, k: int) -> Grounding:
        """Retrieve for a question and decide how it may be answered."""
        collection = self.store.get(name)
        summary = self.store.summary(collection)
        results: list[SearchResult] = []
        unknown: list[str] = []
        rare: list[str] = []
        names: list[str] = []
        if summary["indexed"]:
            collection = self._current(collection, reindex=False)
            results = self._retriever.search(collection, question, k)
            words = topic_words(question)
            counts = self.store.passages.word_counts(collection, words, RARE_CHUNKS)
            unknown = [w for w in words if counts[w] == 0]
            rare = [w for w in words if 0 < counts[w] <= RARE_CHUNKS]
            found = self.store.passages.words_in(rare, [r.chunk.id for r in results])
            rare = [w for w in rare if w not in found]
            judge = get_judge()
            if judge is not None:
                names = [w for w in unknown + rare if not judge.knows(w)]
        return ground(collection.name, question, results, summary, unknown, rare, names)


def _pdf_page(path: str, page: int) -> SourceText:
    """One page of a PDF, extracted and cleaned as ``loaders`` does for indexing."""
    from engine.rag.loaders import DocumentError, open_pdf
    from engine.rag.textio import CONTROL_CHARS

    reader, pages = open_pdf(path, parser_message=False)
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
