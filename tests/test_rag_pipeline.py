"""The indexing pipeline: documents read on a thread of their own, small ones embedded
together, and a batch that cannot be embedded failing its documents, not the run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from engine import Engine
from engine.jobs import JobContext
from engine.rag import loaders
from engine.rag.embedder import Embedder

NOTE = "Note {i}: the spare key for cabinet {i} hangs behind the door of room {i}."


@pytest.fixture
def notes(engine: Engine, tmp_path: Path) -> tuple[Engine, Path]:
    root = tmp_path / "notes"
    root.mkdir()
    for i in range(40):
        (root / f"note{i:02}.txt").write_text(NOTE.format(i=i) + "\n")
    engine.documents.create("notes")
    return engine, root


def test_small_documents_are_read_ahead_and_embedded_together(
    notes: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, root = notes
    readers: set[str] = set()
    real_load = loaders.load_document

    def load(*args: object, **kwargs: object) -> object:
        readers.add(threading.current_thread().name)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    calls: list[int] = []
    real_encode = Embedder.encode

    def encode(self: Embedder, texts: list[str], *args: object, **kwargs: object) -> object:
        if any("spare key" in t for t in texts):  # the indexer's, not the backend measure's
            calls.append(len(texts))
        return real_encode(self, texts, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loaders, "load_document", load)
    monkeypatch.setattr(Embedder, "encode", encode)
    report = engine.documents.add("notes", [str(root)], JobContext())
    assert report.indexed == 40 and report.chunks == 40
    assert readers == {"bastion-reader"}  # parsing ran beside the embedding, not in it
    assert sum(calls) == 40 and len(calls) < 40  # not one model call per document
    hit = engine.documents.search("notes", "spare key for cabinet 17", k=1)[0]
    assert Path(hit.chunk.path).name == "note17.txt"


def test_a_batch_that_cannot_be_embedded_fails_its_documents_and_the_run_goes_on(
    notes: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, root = notes
    real_encode = Embedder.encode
    failures = [1]

    def encode(self: Embedder, texts: list[str], *args: object, **kwargs: object) -> object:
        if failures and len(texts) > 1 and "spare key" in texts[0]:
            failures.pop()
            raise RuntimeError("the runtime ran out of something")
        return real_encode(self, texts, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Embedder, "encode", encode)
    report = engine.documents.add("notes", [str(root)], JobContext())
    assert report.failed and report.indexed + len(report.failed) == 40
    assert {error for _, error in report.failed} == {"indexing failed (RuntimeError)"}
    # The next sync reads the failed ones again and indexes them.
    again = engine.documents.sync("notes", JobContext())
    assert again.indexed == len(report.failed) and not again.failed
    _, summary, _ = engine.documents.status("notes")
    assert summary["indexed"] == 40
