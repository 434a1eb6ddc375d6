"""Bad files in a collection: each gets a state and a message, and the rest is indexed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Engine
from engine.jobs import JobContext
from tests.pdfgen import write_pdf

GOOD = "The lamp room key hangs on the brass hook by the stairs."


@pytest.fixture
def docs(engine: Engine, tmp_path: Path) -> tuple[Engine, Path]:
    engine.documents.create("docs")
    return engine, tmp_path / "docs"


def _states(engine: Engine) -> dict[str, tuple[str, str | None]]:
    _, _, documents = engine.documents.status("docs")
    return {Path(d.path).name: (d.state, d.error) for d in documents}


def test_each_bad_file_gets_a_state_and_the_rest_is_indexed(docs: tuple[Engine, Path]) -> None:
    from pypdf import PdfWriter

    engine, root = docs
    root.mkdir()
    write_pdf(root / "good.pdf", [[GOOD]])
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.4\n" + b"\x00garbage" * 200)
    writer = PdfWriter(clone_from=write_pdf(root / "plain.pdf", [["secret text here"]]))
    writer.encrypt(user_password="hunter2")
    with (root / "encrypted.pdf").open("wb") as fh:
        writer.write(fh)
    (root / "plain.pdf").unlink()
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (root / "latin1.txt").write_bytes(
        "Café crème brûlée, über alles: the keeper's notes.".encode("latin-1")
    )
    (root / "résumé 日本.md").write_text("# Notes\n\nUnicode names are fine.\n", encoding="utf-8")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)

    report = engine.documents.add("docs", [str(root), str(root / "missing.pdf")], JobContext())
    states = _states(engine)
    assert states["good.pdf"][0] == "indexed"
    assert states["latin1.txt"][0] == "indexed"
    assert states["résumé 日本.md"][0] == "indexed"
    assert states["corrupt.pdf"][0] == "failed" and "corrupt" in (states["corrupt.pdf"][1] or "")
    assert states["encrypted.pdf"] == ("failed", states["encrypted.pdf"][1])
    assert "encrypted" in (states["encrypted.pdf"][1] or "")
    assert states["empty.txt"][0] == "skipped" and "empty" in (states["empty.txt"][1] or "")
    assert states["binary.txt"][0] == "failed" and "binary" in (states["binary.txt"][1] or "")
    assert states["picture.png"][0] == "skipped" and "unsupported" in (
        states["picture.png"][1] or ""
    )
    assert states["missing.pdf"] == ("failed", "no such file or folder")
    failed = {Path(p).name for p, _ in report.failed}
    assert failed == {"corrupt.pdf", "encrypted.pdf", "binary.txt", "missing.pdf"}
    assert report.indexed == 3
    latin = engine.documents.search("docs", "crème brûlée keeper", k=1)
    assert "Café crème brûlée" in latin[0].chunk.text


def test_unreadable_file(docs: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, for whom permissions do not stop reads: make opening refuse instead
    # (both ways files are opened: open() and Path.open()).
    import builtins

    engine, root = docs
    root.mkdir()
    (root / "locked.txt").write_text("private\n")
    (root / "open.txt").write_text(GOOD + "\n")
    real_open, real_path_open = builtins.open, Path.open

    def guarded(file: object, *args: object, **kwargs: object) -> object:
        if str(file).endswith("locked.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    def guarded_path(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_path_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(Path, "open", guarded_path)
    engine.documents.add("docs", [str(root)], JobContext())
    states = _states(engine)
    assert states["locked.txt"][0] == "failed" and "permission denied" in states["locked.txt"][1]
    assert states["open.txt"][0] == "indexed"


class _EditingContext(JobContext):
    """Appends to a file the first times the loader checks in: a file being edited."""

    def __init__(self, path: Path, times: int) -> None:
        super().__init__()
        self.path, self.times = path, times

    def check_cancelled(self) -> None:
        if self.times > 0:
            self.times -= 1
            with self.path.open("a") as fh:
                fh.write("One more line written while indexing.\n")
        super().check_cancelled()


def test_file_changing_once_while_indexed_is_read_again(docs: tuple[Engine, Path]) -> None:
    engine, root = docs
    root.mkdir()
    target = root / "log.txt"
    target.write_text(GOOD + "\n")
    engine.documents.add("docs", [str(root)], _EditingContext(target, times=1))
    assert _states(engine)["log.txt"][0] == "indexed"
    chunks = engine.documents.search("docs", "written while indexing", k=1)
    assert "written while indexing" in chunks[0].chunk.text  # the final content was indexed


def test_file_that_keeps_changing_fails_with_a_reason(
    docs: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.rag import reading

    engine, root = docs
    root.mkdir()
    target = root / "log.txt"
    target.write_text(GOOD + "\n")
    real_hash = reading._sha256

    def hash_then_edit(path: str, ctx: JobContext) -> str:
        # Someone writes to the file right after each time it is hashed: every attempt.
        digest = real_hash(path, ctx)
        with open(path, "a") as fh:
            fh.write("Another line from a program that keeps writing.\n")
        return digest

    monkeypatch.setattr(reading, "_sha256", hash_then_edit)
    report = engine.documents.add("docs", [str(root)], JobContext())
    state, error = _states(engine)["log.txt"]
    assert state == "failed" and "changed while it was being indexed" in (error or "")
    assert report.failed and report.indexed == 0
