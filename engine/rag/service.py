"""The documents area as the engine facade uses it: collections, indexing, search, grounding."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
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
