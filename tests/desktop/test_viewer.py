"""The source viewer: cited lines of a text file, the cited page of a PDF, a missing file."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices

from desktop.app import MainWindow
from desktop.viewer import SourceViewer, open_source, show_source, snippet_span
from engine import Citation
from engine.errors import NotFound
from engine.rag.service import Documents
from tests.pdfgen import write_pdf


def _cite(fields: dict[str, object]) -> Citation:
    """A citation from the fields a test names (the others defaulted)."""
    return Citation.from_public({"n": 1, **fields})


def _open(qtbot, window: MainWindow, citation: dict[str, object]) -> SourceViewer:
    viewer = open_source(window.chat, _cite(citation), window.engine)
    qtbot.waitUntil(lambda: not viewer.loading, timeout=10_000)
    return viewer


def _numbered(path: Path, count: int) -> Path:
    path.write_text(
        "".join(f"line {n}: the keeper wrote in the log\n" for n in range(1, count + 1))
    )
    return path


def test_text_citation_highlights_the_cited_lines_and_scrolls_to_them(
    window: MainWindow, qtbot, tmp_path: Path
) -> None:
    path = _numbered(tmp_path / "log.txt", 200)
    citation = {
        "n": 1,
        "path": str(path),
        "page": None,
        "snippet": "line 121: the keeper wrote in the log",
        "score": 0.5,
        "line_start": 120,
        "line_end": 122,
    }
    viewer = _open(qtbot, window, citation)
    viewer.resize(500, 300)  # far fewer than 200 lines fit: scrolling is needed
    qtbot.waitExposed(viewer)
    viewer.show_citation(_cite(citation))  # again, now at its final size
    qtbot.waitUntil(lambda: not viewer.loading)

    assert viewer.isVisible() and not viewer.isModal()
    assert viewer.location.text() == "Lines 120–122"
    lines, snippet = viewer.highlighted()
    assert lines == "\n".join(f"line {n}: the keeper wrote in the log" for n in (120, 121, 122))
    assert snippet == citation["snippet"]
    first_visible = viewer.text.firstVisibleBlock().blockNumber()
    assert 0 < first_visible <= 119  # scrolled down, and line 120 is on screen
    assert viewer.text.cursorRect().intersects(viewer.text.viewport().rect())
    assert not viewer.prev_button.isVisible() and not viewer.message.isVisible()


def test_pdf_citation_shows_the_cited_page_with_its_snippet(
    window: MainWindow, qtbot, tmp_path: Path
) -> None:
    pdf = write_pdf(
        tmp_path / "manual.pdf",
        [
            ["Page one talks about the lamp room."],
            ["Fog signals warned sailors.", "The Zephyrion valve is torqued to 42 Nm."],
            ["Page three is about supply boats."],
        ],
    )
    citation = {
        "n": 2,
        "path": str(pdf),
        "page": 2,
        "snippet": "The Zephyrion valve is torqued to 42 Nm.",
        "score": 0.8,
        "line_start": None,
        "line_end": None,
    }
    viewer = _open(qtbot, window, citation)
    assert viewer.location.text() == "Page 2 of 3"
    assert "Zephyrion" in viewer.text.toPlainText()
    assert "lamp room" not in viewer.text.toPlainText()
    assert viewer.highlighted() == ["The Zephyrion valve is torqued to 42 Nm."]
    assert viewer.prev_button.isEnabled() and viewer.next_button.isEnabled()

    qtbot.mouseClick(viewer.next_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: viewer.location.text() == "Page 3 of 3")
    assert "supply boats" in viewer.text.toPlainText()
    assert viewer.highlighted() == []  # the snippet is on page 2
    assert not viewer.next_button.isEnabled()
    viewer.go_to_page(1)
    qtbot.waitUntil(lambda: viewer.location.text() == "Page 1 of 3")
    assert "lamp room" in viewer.text.toPlainText() and not viewer.prev_button.isEnabled()


def test_pdf_citation_opens_the_rendered_page_with_the_passage_found(
    window: MainWindow, qtbot, tmp_path: Path
) -> None:
    from PySide6.QtCore import QModelIndex

    pdf = write_pdf(
        tmp_path / "manual.pdf",
        [["Page one talks about the lamp room."], ["The Zephyrion valve is torqued to 42 Nm."]],
    )
    citation = {"n": 1, "path": str(pdf), "page": 2, "snippet": "The Zephyrion valve is torqued"}
    viewer = _open(qtbot, window, citation)
    assert viewer.pdf is not None, "QtPdf (PySide6-Addons) is a dependency"
    assert viewer.tabs.currentWidget() is viewer.pdf
    assert viewer.pdf.current_page == 2
    qtbot.waitUntil(lambda: viewer.pdf.search.rowCount(QModelIndex()) >= 1, timeout=10_000)
    current = viewer.pdf.view.currentSearchResultIndex()
    assert current >= 0 and viewer.pdf.search.resultAtIndex(current).page() == 1
    assert viewer.pdf.current_page == 2
    viewer.go_to_page(1)
    qtbot.waitUntil(lambda: viewer.location.text() == "Page 1 of 2")
    assert viewer.pdf.current_page == 1
    # A text file has no rendered page: the tab is hidden, the text in front.
    notes = tmp_path / "notes.txt"
    notes.write_text("one\ntwo\n")
    other = _open(qtbot, window, {"n": 1, "path": str(notes), "line_start": 2, "line_end": 2})
    assert other.tabs.currentWidget() is other.text and not other.tabs.isTabVisible(0)


def test_missing_file_gives_a_plain_message(window: MainWindow, qtbot, tmp_path: Path) -> None:
    gone = tmp_path / "moved-away.pdf"
    viewer = _open(qtbot, window, {"path": str(gone), "page": 3, "snippet": "x"})
    assert viewer.message.isVisible()
    assert "no longer at" in viewer.message.text() and str(gone) in viewer.message.text()
    assert not viewer.text.isVisible() and not viewer.open_button.isEnabled()


def test_unreadable_file_gives_a_plain_message(window: MainWindow, qtbot, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 not really\n")
    viewer = _open(qtbot, window, {"path": str(broken), "page": 1})
    assert viewer.message.isVisible() and "corrupt PDF" in viewer.message.text()


def test_open_in_default_app_opens_the_file(
    window: MainWindow, qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[QUrl] = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url) or True)
    path = _numbered(tmp_path / "notes.md", 3)
    viewer = _open(qtbot, window, {"path": str(path), "line_start": 2, "line_end": 2})
    qtbot.mouseClick(viewer.open_button, Qt.MouseButton.LeftButton)
    assert [u.toLocalFile() for u in opened] == [str(path)]


def test_a_second_citation_of_the_same_file_reuses_the_window(
    window: MainWindow, qtbot, tmp_path: Path
) -> None:
    path = _numbered(tmp_path / "log.txt", 30)
    show_source(window.chat, Citation(0, str(path), line_start=3, line_end=3), window.engine)
    viewers = window.findChildren(SourceViewer)
    assert len(viewers) == 1
    first = viewers[0]
    qtbot.waitUntil(lambda: not first.loading)
    again = _open(qtbot, window, {"path": str(path), "line_start": 20, "line_end": 21})
    assert again is first and len(window.findChildren(SourceViewer)) == 1
    assert again.highlighted()[0].startswith("line 20:")


def test_large_file_shows_a_window_around_the_cited_line(
    window: MainWindow, qtbot, tmp_path: Path
) -> None:
    path = _numbered(tmp_path / "big.log", 20_000)
    viewer = _open(qtbot, window, {"path": str(path), "line_start": 15_000, "line_end": 15_000})
    assert viewer.source is not None and viewer.source.truncated
    assert viewer.source.first_line > 1
    assert viewer.highlighted() == ["line 15000: the keeper wrote in the log"]
    assert "large file" in viewer.message.text() and viewer.text.isVisible()


def test_source_text_reads_like_the_indexer(tmp_path: Path) -> None:
    latin = tmp_path / "recipes.txt"
    lines = [
        "The harbour stew of the keepers, as the cook wrote it down in the winter log.",
        "Crème fraîche, smoked paprika and a glass of rosé: the café's secret, déjà vu.",
    ]
    latin.write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))  # old Windows file
    source = Documents.source_text(str(latin))
    assert source.text == "\n".join(lines) and source.first_line == 1
    with pytest.raises(NotFound):
        Documents.source_text(str(tmp_path / "nope.txt"))


def test_snippet_is_found_across_whitespace_and_ellipses() -> None:
    text = "Alpha beta\ngamma   delta. " + " ".join(f"w{i}" for i in range(20)) + " end."
    start, end = snippet_span(text, "beta gamma delta.") or (0, 0)
    assert text[start:end] == "beta\ngamma   delta."
    assert snippet_span(text, "…beta gamma delta.…") == (start, end)
    # Not found whole (a word differs in the middle): from its first to its last words.
    changed = " ".join(f"w{i}" if i != 10 else "other" for i in range(20)) + " end."
    start, end = snippet_span(text, changed) or (0, 0)
    assert text[start:end] == " ".join(f"w{i}" for i in range(20)) + " end."
    assert snippet_span(text, "not in there") is None
    assert snippet_span(text, "") is None


def test_closing_while_loading_is_safe(window: MainWindow, qtbot, tmp_path: Path) -> None:
    path = _numbered(tmp_path / "log.txt", 50_000)
    viewer = open_source(window.chat, Citation(0, str(path), line_start=40_000), window.engine)
    assert viewer.loading
    viewer.close()  # the read still runs; the viewer goes once it has reported
    qtbot.waitUntil(lambda: not window.findChildren(SourceViewer), timeout=10_000)
