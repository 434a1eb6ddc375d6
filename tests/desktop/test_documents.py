"""The Documents page on a real engine: create, add (dialog, drop), index, cancel, sync, remove."""

from __future__ import annotations

import itertools
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QTimer, QUrl
from PySide6.QtWidgets import QApplication, QFileDialog, QInputDialog, QMessageBox

from desktop.app import MainWindow
from desktop.documents.files import CHUNKS, FILE, PAGES, PROBLEM, STATE
from desktop.documents.progress import format_duration, progress_text
from desktop.pages.documents import DocumentsPage
from engine.jobs import Progress
from tests.pdfgen import write_pdf
from tests.rag_corpus import FACTS, FILLER, make_corpus

INDEX_TIMEOUT_MS = 120_000
# Every test here indexes with the default embedder (see tests/desktop/conftest.py).
pytestmark = pytest.mark.usefixtures("shared_embedder")


@pytest.fixture
def page(window: MainWindow, qtbot) -> Iterator[DocumentsPage]:
    window.show_page("Documents")
    page = window.documents
    qtbot.waitUntil(lambda: not page.busy, timeout=10_000)
    yield page
    page.cancel_indexing()  # a failed test must not leave a thread writing to a closed db
    qtbot.waitUntil(lambda: not page.busy, timeout=INDEX_TIMEOUT_MS)


def _create(qtbot, page: DocumentsPage, name: str = "docs") -> None:
    page.create_collection(name)
    qtbot.waitUntil(lambda: page.selected == name and not page.busy, timeout=10_000)


def _index(qtbot, page: DocumentsPage, paths: list[Path]) -> object:
    """Add ``paths`` to the shown collection and wait for the report and the fresh table."""
    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS) as finished:
        page.add_paths([str(p) for p in paths])
    qtbot.waitUntil(lambda: not page.busy, timeout=10_000)
    return finished.args[0]


def _rows(page: DocumentsPage) -> dict[str, dict[str, str]]:
    """What the table shows, by file name."""
    model = page.panel.table.model()
    rows = {}
    for r in range(model.rowCount()):
        cell = {c: model.index(r, c).data() for c in (FILE, STATE, CHUNKS, PAGES, PROBLEM)}
        rows[cell[FILE]] = {
            "state": cell[STATE],
            "chunks": cell[CHUNKS],
            "pages": cell[PAGES],
            "problem": cell[PROBLEM],
            "tooltip": model.index(r, FILE).data(Qt.ItemDataRole.ToolTipRole),
        }
    return rows


def _write_long_files(root: Path, count: int, lines: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        body = "\n".join(
            f"{FACTS[(i + k) % len(FACTS)][2]} {FILLER[k % len(FILLER)]} Note {i}.{k}."
            for k in range(lines)
        )
        (root / f"part-{i:02d}.txt").write_text(body + "\n", encoding="utf-8")


def test_create_collection_by_dialog_and_refuse_bad_names(
    window: MainWindow, page: DocumentsPage, qtbot
) -> None:
    assert page.detail_stack.currentIndex() == 0  # the empty state explains collections
    assert "No collections yet" in page.empty_label.text()
    qtbot.mouseClick(page.new_button, Qt.MouseButton.LeftButton)
    dialog = page.findChild(QInputDialog)
    assert dialog is not None and dialog.isVisible()
    dialog.setTextValue("Research notes")
    dialog.accept()
    qtbot.waitUntil(lambda: page.selected == "Research notes" and not page.busy)
    assert [page.collection_list.item(i).text() for i in range(page.collection_list.count())] == [
        "Research notes"
    ]
    assert page.detail_stack.currentIndex() == 1
    assert page.panel.title.text() == "Research notes"
    assert "0 files" in page.panel.summary.text()
    assert "created" in window.notice.label.text()

    page.create_collection("bad/name")
    qtbot.waitUntil(lambda: "invalid collection name" in window.notice.label.text())
    page.create_collection("Research notes")
    qtbot.waitUntil(lambda: "exists already" in window.notice.label.text())
    assert page.collection_list.count() == 1


def test_add_folder_shows_progress_and_fills_the_table(
    window: MainWindow, page: DocumentsPage, qtbot, tmp_path: Path
) -> None:
    root = tmp_path / "docs"
    make_corpus(root)
    _create(qtbot, page)
    seen: list[str] = []
    maxima: list[int] = []

    def watch() -> None:
        if page.panel.progress.isVisible():
            seen.append(page.panel.progress.label.text())
            maxima.append(page.panel.progress.bar.maximum())

    poll = QTimer()
    poll.timeout.connect(watch)
    poll.start(20)
    # Through the folder dialog, as a user would (Qt's own dialog offscreen).
    qtbot.mouseClick(page.panel.add_folder_button, Qt.MouseButton.LeftButton)
    dialog = page.findChild(QFileDialog)
    assert dialog is not None
    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS) as finished:
        dialog.selectFile(str(root))
        dialog.accept()
        assert page.indexing and page.panel.progress.isVisible()
        assert not page.panel.sync_button.isEnabled()  # one job at a time
    poll.stop()
    qtbot.waitUntil(lambda: not page.busy)

    report = finished.args[0]
    assert report.indexed == 4 and not report.failed and not report.cancelled
    assert any(re.match(r"^\d/4 files", text) for text in seen), seen
    assert 4 in maxima
    assert not page.panel.progress.isVisible() and page.panel.sync_button.isEnabled()
    rows = _rows(page)
    assert set(rows) == {"manual.pdf", "guide.pdf", "history.md", "recipes.txt"}
    assert all(r["state"] == "Indexed" and int(r["chunks"]) > 0 for r in rows.values())
    assert rows["manual.pdf"]["pages"] == "5" and rows["guide.pdf"]["pages"] == "4"
    assert "4 files" in page.panel.summary.text() and "4 indexed" in page.panel.summary.text()
    assert "4 files indexed" in window.notice.label.text()

    # A double click opens the file in the source viewer.
    from desktop.viewer import SourceViewer

    row = next(
        r
        for r in range(page.panel.table.model().rowCount())
        if "history" in str(page.panel.table.model().index(r, FILE).data())
    )
    rect = page.panel.table.visualRect(page.panel.table.model().index(row, FILE))
    qtbot.mouseClick(page.panel.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.mouseDClick(page.panel.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    viewers = window.findChildren(SourceViewer)
    assert [v.path for v in viewers] == [str(root / "notes" / "history.md")]
    qtbot.waitUntil(lambda: not viewers[0].loading)
    assert "Bastion Point lighthouse" in viewers[0].text.toPlainText()


def test_failed_and_unsupported_files_are_explained(
    page: DocumentsPage, qtbot, tmp_path: Path
) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "good.md").write_text("# Title\n\n" + " ".join(FILLER) + "\n")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj garbage that is not a pdf\n")
    write_pdf(root / "scan.pdf", [[], []])  # pages without a text layer
    (root / "table.xyz").write_text("not a format Bastion reads\n")
    _create(qtbot, page)
    report = _index(qtbot, page, [root])

    assert sorted(Path(p).name for p, _ in report.failed) == ["broken.pdf", "scan.pdf"]
    rows = _rows(page)
    assert rows["good.md"]["state"] == "Indexed"
    broken = rows["broken.pdf"]
    assert broken["state"] == "Failed" and broken["problem"].startswith("corrupt PDF")
    assert "damaged" in broken["tooltip"]  # the advice, not only the message
    assert rows["scan.pdf"]["state"] == "Failed" and "no text layer" in rows["scan.pdf"]["problem"]
    assert "OCR" in rows["scan.pdf"]["tooltip"]
    assert rows["table.xyz"]["state"] == "Skipped"
    assert rows["table.xyz"]["problem"] == "unsupported file type (.xyz)"

    page.panel.problems_only.setChecked(True)
    assert set(_rows(page)) == {"broken.pdf", "scan.pdf", "table.xyz"}
    page.panel.table.selectRow(0)
    page.panel.table.setCurrentIndex(page.panel.table.model().index(0, 0))
    assert "broken.pdf" in page.panel.details.text() and "damaged" in page.panel.details.text()
    page.panel.problems_only.setChecked(False)
    assert len(_rows(page)) == 4


def test_cancel_mid_indexing_keeps_a_consistent_state_and_sync_finishes(
    window: MainWindow, page: DocumentsPage, qtbot, tmp_path: Path
) -> None:
    root = tmp_path / "big"
    _write_long_files(root, count=5, lines=100)  # seconds per file: time to cancel
    _create(qtbot, page)
    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS) as finished:
        page.add_paths([str(root)])
        qtbot.waitUntil(lambda: page.panel.progress.bar.value() >= 1, timeout=INDEX_TIMEOUT_MS)
        qtbot.mouseClick(page.panel.progress.cancel_button, Qt.MouseButton.LeftButton)
        assert page.panel.progress.cancel_button.text() == "Cancelling…"
    qtbot.waitUntil(lambda: not page.busy)
    report = finished.args[0]
    assert report is not None and report.cancelled, "indexing ended before the cancel"
    assert "cancelled" in window.notice.label.text()
    assert not page.panel.progress.isVisible() and page.panel.sync_button.isEnabled()

    rows = _rows(page)
    assert len(rows) == 5
    states = {r["state"] for r in rows.values()}
    assert states <= {"Indexed", "Waiting"} and states == {"Indexed", "Waiting"}
    indexed = [int(r["chunks"]) for r in rows.values() if r["state"] == "Indexed"]
    assert all(n > 0 for n in indexed)
    _, summary, docs = window.engine.documents.status("docs")
    assert summary["chunks"] == sum(indexed)  # no partial document counts
    assert all(d.chunk_count == 0 for d in docs if d.state == "pending")

    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS) as synced:
        qtbot.mouseClick(page.panel.sync_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not page.busy)
    assert synced.args[0].indexed == 5 - len(indexed)
    assert {r["state"] for r in _rows(page).values()} == {"Indexed"}


def test_sync_picks_up_changes_and_remove_deletes_the_collection(
    window: MainWindow, page: DocumentsPage, qtbot, tmp_path: Path
) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    (root / "a.txt").write_text(FILLER[0] + "\n")
    (root / "b.txt").write_text(FILLER[1] + "\n")
    _create(qtbot, page)
    _index(qtbot, page, [root])
    assert set(_rows(page)) == {"a.txt", "b.txt"}
    assert "older Bastion" not in page.panel.summary.text()
    # Cut into chunks by a Bastion from before chunker versions: the page says so, and
    # Sync indexes it again.
    window.engine.documents.store.db.execute("UPDATE collections SET chunker_version = NULL")
    page.refresh()
    qtbot.waitUntil(lambda: "older Bastion" in page.panel.summary.text(), timeout=10_000)

    (root / "b.txt").unlink()
    (root / "c.md").write_text("# New\n\n" + FILLER[2] + "\n")
    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS) as synced:
        page.sync()
    qtbot.waitUntil(lambda: not page.busy)
    assert synced.args[0].removed == 1 and synced.args[0].indexed == 2  # a.txt cut again
    assert set(_rows(page)) == {"a.txt", "c.md"}
    assert "older Bastion" not in page.panel.summary.text()
    assert "1 removed" in window.notice.label.text()

    qtbot.mouseClick(page.panel.remove_button, Qt.MouseButton.LeftButton)
    box = page.findChild(QMessageBox)
    assert box is not None and "docs" in box.text()
    qtbot.mouseClick(box.button(QMessageBox.StandardButton.Yes), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.collection_list.count() == 0 and not page.busy)
    assert page.selected is None and page.detail_stack.currentIndex() == 0
    assert window.engine.documents.all() == []
    assert (root / "a.txt").exists()  # the user's files are not touched


def _drop(page: DocumentsPage, urls: list[QUrl]) -> tuple[bool, bool]:
    """Drag ``urls`` over the page and drop them; whether the enter and the drop were taken."""
    from PySide6.QtGui import QDragEnterEvent, QDropEvent

    mime = QMimeData()
    mime.setUrls(urls)
    point = page.rect().center()
    with warnings.catch_warnings():
        # PySide marks this constructor deprecated (a QPoint), yet it is Qt 6's only one.
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(
            point,
            Qt.DropAction.CopyAction,
            mime,
            Qt.MouseButton.LeftButton,
            Qt.KeyboardModifier.NoModifier,
        )
    QApplication.sendEvent(page, enter)
    if not enter.isAccepted():
        return False, False
    drop = QDropEvent(
        QPointF(point),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    QApplication.sendEvent(page, drop)
    return True, drop.isAccepted()


def test_dropping_files_adds_them_and_a_second_drop_waits_its_turn(
    page: DocumentsPage, qtbot, tmp_path: Path
) -> None:
    first = tmp_path / "first.md"
    first.write_text("# First\n\n" + FILLER[3] + "\n")
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "second.txt").write_text(FILLER[4] + "\n")
    (folder / "third.txt").write_text(FILLER[5] + "\n")
    _create(qtbot, page)

    assert _drop(page, [QUrl("https://example.com/a.pdf")]) == (False, False)
    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS):
        assert _drop(page, [QUrl.fromLocalFile(str(first))]) == (True, True)
        assert page.indexing
        # Dropped while the first is indexing: queued, indexed right after.
        assert _drop(page, [QUrl.fromLocalFile(str(folder))]) == (True, True)
    qtbot.waitUntil(lambda: len(_rows(page)) == 3 and not page.busy, timeout=INDEX_TIMEOUT_MS)
    rows = _rows(page)
    assert set(rows) == {"first.md", "second.txt", "third.txt"}
    assert all(r["state"] == "Indexed" for r in rows.values())


def test_event_loop_keeps_turning_while_a_collection_indexes(
    page: DocumentsPage, qtbot, tmp_path: Path
) -> None:
    """The GUI thread never waits for indexing: a 15 ms timer keeps ticking throughout.

    A warm-up collection first loads the embedder. (The very first indexing on a machine
    also exports it to ONNX, ~30 s once; importing torch for that holds the interpreter
    lock for up to ~1 s at a time whichever thread does it — an engine matter, reported
    to the lead.) Blocking would stop the timer for the whole run, seconds; the bound
    leaves room for a busy 2-core machine's scheduler.
    """
    warm = tmp_path / "warm.txt"
    warm.write_text(FILLER[0] + "\n")
    _create(qtbot, page, "warm-up")
    _index(qtbot, page, [warm])
    root = tmp_path / "corpus"
    make_corpus(root)
    _write_long_files(root / "long", count=2, lines=150)  # a few seconds of indexing
    _create(qtbot, page)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(15)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start()
    with qtbot.waitSignal(page.indexing_finished, timeout=INDEX_TIMEOUT_MS) as finished:
        page.add_paths([str(root)])
        started = len(ticks)
    timer.stop()
    assert finished.args[0].indexed == 6
    during = ticks[started:]
    assert len(during) >= 10, "the timer hardly ticked while indexing"
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert max(gaps) < 0.5, f"the GUI thread was blocked for {max(gaps):.3f} s"


def test_progress_line_says_count_rate_and_eta() -> None:
    assert progress_text(Progress(0, None, "", 0.1)) == "Looking for files…"
    text = progress_text(Progress(10, 40, "a.pdf", 5.0))
    assert text == "10/40 files · 2.0 files/s · ETA 15 s"
    slow = progress_text(Progress(2, 4, "b.pdf", 60.0))
    assert slow == "2/4 files · 30.0 s/file · ETA 1 min 00 s"
    assert progress_text(Progress(4, 4, "done", 8.0)) == "4/4 files · 2.0 s/file"
    assert format_duration(3725) == "1 h 02 min"
