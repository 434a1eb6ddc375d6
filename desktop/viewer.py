"""The source viewer: a cited document opened at the cited page or lines, snippet highlighted.

``show_source(parent, citation, engine)`` opens a non-modal window (one per file and main window:
a second citation of the same file moves the open one). The text comes from the engine
(``Documents.source_text``), read as the indexer read it, so page and line numbers and
the snippet match what was cited: a PDF shows the cited page's text with previous/next
page buttons; a text file shows its lines with the cited ones highlighted and scrolled
into view. The text is read off the GUI thread (a page of a large PDF can take a moment).

A PDF also shows as its rendered page (QtPdf, from PySide6-Addons, in a "Page" tab in
front of the text), with the start of the cited passage highlighted; without QtPdf only
the text layer is shown. "Open in default app" hands the file to the user's own reader.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import (
    QCloseEvent,
    QColor,
    QDesktopServices,
    QFontDatabase,
    QTextCharFormat,
    QTextCursor,
)
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTabWidget,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from desktop import ops, pdfpage
from desktop.pdfpage import PdfPage
from engine import BastionError, Citation, NotFound

if TYPE_CHECKING:
    from engine import Engine, SourceText

log = logging.getLogger(__name__)

LINES_COLOR = QColor(255, 214, 10, 70)  # the cited lines: a soft band, readable on any theme
SNIPPET_COLOR = QColor(255, 214, 10, 150)  # the snippet itself: stronger
_EDGE_WORDS = 8  # a snippet that is not found whole is found by its first and last words


def show_source(parent: QWidget, citation: Citation, engine: Engine) -> None:
    """Open the cited source (non-modal) at the cited page or lines.

    Args:
        parent: a widget of the main window; the viewer belongs to that window.
        citation: the file, and its page (PDF) or lines, and the snippet to mark.
        engine: the engine that reads the source's text.
    """
    open_source(parent, citation, engine)


def open_source(parent: QWidget, citation: Citation, engine: Engine) -> SourceViewer:
    """``show_source`` that returns the viewer (reused when the file is already open)."""
    owner = parent.window()
    path = citation.path
    for viewer in owner.findChildren(SourceViewer):
        if viewer.path == path and viewer.isVisible():
            viewer.show_citation(citation)
            viewer.raise_()
            viewer.activateWindow()
            return viewer
    viewer = SourceViewer(engine, owner)
    viewer.show_citation(citation)
    viewer.show()
    return viewer


def snippet_span(text: str, snippet: str) -> tuple[int, int] | None:
    """Where ``snippet`` is in ``text``, whatever the whitespace between its words.

    Snippets are flattened (runs of whitespace become one space) and may be cut with "…";
    a long one that is not found whole is found from its first words to its last words.
    """
    words = snippet.replace("…", " ").split()
    if not words:
        return None

    def find(ws: list[str], start: int = 0) -> re.Match[str] | None:
        return re.compile(r"\s+".join(re.escape(w) for w in ws)).search(text, start)

    whole = find(words)
    if whole:
        return whole.span()
    if len(words) <= _EDGE_WORDS:
        return None
    head = find(words[:_EDGE_WORDS])
    if head is None:
        return None
    tail = find(words[-_EDGE_WORDS:], head.end())
    return (head.start(), tail.end()) if tail else head.span()


class SourceViewer(QDialog):
    """One document's text at a citation; previous/next page for PDFs."""

    def __init__(self, engine: Engine, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.setModal(False)
        self.resize(760, 640)
        self.path = ""
        self.page: int | None = None
        self.pages: int | None = None
        self.source: SourceText | None = None
        self._citation = Citation(0, "")
        self._request = 0  # only the latest read is shown
        self._loading: ops.Operation | None = None
        self._in_flight = 0
        self._closed = False

        layout = QVBoxLayout(self)
        self.name_label = QLabel()
        font = self.name_label.font()
        font.setBold(True)
        font.setPointSizeF(font.pointSizeF() * 1.2)
        self.name_label.setFont(font)
        self.name_label.setTextFormat(Qt.TextFormat.PlainText)
        self.path_label = QLabel()
        self.path_label.setTextFormat(Qt.TextFormat.PlainText)
        self.path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.path_label.setWordWrap(True)
        layout.addWidget(self.name_label)
        layout.addWidget(self.path_label)

        bar = QHBoxLayout()
        self.prev_button = QPushButton("◀ Previous page")
        self.next_button = QPushButton("Next page ▶")
        self.prev_button.clicked.connect(lambda: self.go_to_page((self.page or 1) - 1))
        self.next_button.clicked.connect(lambda: self.go_to_page((self.page or 1) + 1))
        self.location = QLabel()
        self.open_button = QPushButton("Open in default app")
        self.open_button.setToolTip("Open the file in the application your system uses for it")
        self.open_button.clicked.connect(self.open_externally)
        bar.addWidget(self.prev_button)
        bar.addWidget(self.location)
        bar.addWidget(self.next_button)
        bar.addStretch(1)
        bar.addWidget(self.open_button)
        layout.addLayout(bar)

        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextFormat(Qt.TextFormat.PlainText)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.hide()
        layout.addWidget(self.message)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setAccessibleName("Source text")
        # With QtPdf a PDF also shows as its rendered page, in a tab before its text.
        self.pdf: PdfPage | None = PdfPage() if pdfpage.available() else None
        self.body: QWidget = self.text
        if self.pdf is not None:
            self.tabs = QTabWidget()
            self.tabs.addTab(self.pdf, "Page")
            self.tabs.addTab(self.text, "Text")
            self.body = self.tabs
        layout.addWidget(self.body, 1)

    @property
    def loading(self) -> bool:
        return self._loading is not None

    def closeEvent(self, event: QCloseEvent) -> None:
        """Closed viewers are deleted, but only once no read still reports to them."""
        super().closeEvent(event)
        self._closed = True
        if self._in_flight == 0:
            self.deleteLater()

    # -- what to show ---------------------------------------------------------------

    def show_citation(self, citation: Citation) -> None:
        """Show ``citation``: its file at its page (PDF) or around its lines."""
        self._citation = citation
        self.path = citation.path
        name = os.path.basename(self.path) or self.path
        self.setWindowTitle(f"{name} — Bastion")
        self.name_label.setText(name)
        self.path_label.setText(self.path)
        self.page = _positive(citation.page)
        self.pages = None
        self._load(self.page, _positive(citation.line_start))

    def go_to_page(self, page: int) -> None:
        """Another page of the PDF shown (the citation's snippet stays marked on its page)."""
        if self.pages is None or not 1 <= page <= self.pages or page == self.page:
            return
        self.page = page
        self._load(page, None)

    def open_externally(self) -> None:
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(self.path)):
            self._show_message("No application on this system opens this kind of file.")

    # -- reading ----------------------------------------------------------------------

    def _load(self, page: int | None, line: int | None) -> None:
        self._request += 1
        request, path = self._request, self.path
        docs = self.engine.documents
        self._set_navigation(enabled=False)
        self.location.setText("Loading…")
        self._in_flight += 1
        self._loading = ops.run(
            lambda _: docs.source_text(path, page, line),
            on_success=lambda source: self._on_loaded(request, source),
            on_failure=lambda exc: self._on_failed(request, exc),
            on_finished=lambda: self._on_finished(request),
            parent=self,
            name="source-text",
        )

    def _on_finished(self, request: int) -> None:
        self._in_flight -= 1
        if request == self._request:
            self._loading = None
        if self._closed and self._in_flight == 0:
            self.deleteLater()

    def _on_loaded(self, request: int, source: SourceText) -> None:
        if request != self._request:
            return
        self.source = source
        self.message.hide()
        self.body.show()
        self.open_button.setEnabled(True)
        fixed = source.kind not in ("pdf", "docx")  # the others are shown as their source
        self.text.setFont(
            QFontDatabase.systemFont(
                QFontDatabase.SystemFont.FixedFont
                if fixed
                else QFontDatabase.SystemFont.GeneralFont
            )
        )
        self.text.setPlainText(source.text)
        if source.pages is not None:
            self.page, self.pages = source.page, source.pages
            self.location.setText(f"Page {self.page} of {self.pages}")
            self._set_navigation(enabled=True)
        else:
            self.location.setText(self._lines_text(source))
            self.prev_button.hide()
            self.next_button.hide()
        self._highlight(source)
        self._show_rendered_page(source)
        if source.truncated:
            self._show_message(
                f"A large file: lines {source.first_line}–"
                f"{source.first_line + source.text.count(chr(10))} are shown here. "
                "Open it in the default app to see all of it.",
                keep_text=True,
            )

    def _show_rendered_page(self, source: SourceText) -> None:
        """Put the rendered page in front for a PDF that QtPdf can open; else the text."""
        if self.pdf is None:
            return
        rendered = (
            source.kind == "pdf"
            and source.page is not None
            and self.pdf.show_page(self.path, source.page, self._citation.snippet)
        )
        self.tabs.setTabVisible(0, bool(rendered))
        self.tabs.setCurrentWidget(self.pdf if rendered else self.text)

    def _on_failed(self, request: int, exc: BaseException) -> None:
        if request != self._request:
            return
        self.source = None
        self.location.setText("")
        if isinstance(exc, NotFound):
            self.open_button.setEnabled(False)
            self._show_message(
                f"The file is no longer at {self.path}.\nIt may have been moved, renamed or "
                "deleted since it was indexed; Sync its collection to update the index."
            )
        elif isinstance(exc, BastionError):
            self._show_message(f"Bastion cannot show this file: {exc}")
        else:
            log.error("source viewer: %s", exc, exc_info=(type(exc), exc, exc.__traceback__))
            self._show_message(f"Something went wrong reading the file: {type(exc).__name__}")

    def _show_message(self, text: str, keep_text: bool = False) -> None:
        self.message.setText(text)
        self.message.show()
        if not keep_text:
            self.body.hide()
            self.prev_button.hide()
            self.next_button.hide()

    def _set_navigation(self, enabled: bool) -> None:
        is_pdf = self.pages is not None or self.path.lower().endswith(".pdf")
        self.prev_button.setVisible(is_pdf)
        self.next_button.setVisible(is_pdf)
        self.prev_button.setEnabled(enabled and (self.page or 1) > 1)
        self.next_button.setEnabled(
            enabled and self.pages is not None and (self.page or 1) < self.pages
        )

    def _lines_text(self, source: SourceText) -> str:
        start, end = self._cited_lines()
        if start is None:
            return ""
        return f"Line {start}" if end in (None, start) else f"Lines {start}–{end}"

    # -- highlighting -----------------------------------------------------------------

    def _cited_lines(self) -> tuple[int | None, int | None]:
        start = _positive(self._citation.line_start)
        end = _positive(self._citation.line_end) or start
        return start, end

    def _highlight(self, source: SourceText) -> None:
        """Mark the cited lines and the snippet; scroll the first mark into view."""
        selections: list[QTextEdit.ExtraSelection] = []
        doc = self.text.document()
        anchor: int | None = None
        start, end = self._cited_lines()
        if source.pages is None and start is not None and end is not None:
            first = doc.findBlockByNumber(start - source.first_line)
            last = doc.findBlockByNumber(end - source.first_line)
            if first.isValid():
                last = last if last.isValid() else doc.lastBlock()
                cursor = QTextCursor(first)
                cursor.setPosition(
                    last.position() + last.length() - 1, QTextCursor.MoveMode.KeepAnchor
                )
                selections.append(_selection(cursor, LINES_COLOR, full_width=True))
                anchor = first.position()
        cited_page = _positive(self._citation.page)
        span = None
        if source.pages is None or source.page == cited_page:
            span = snippet_span(source.text, self._citation.snippet)
        if span is not None:
            cursor = QTextCursor(doc)
            cursor.setPosition(span[0])
            cursor.setPosition(span[1], QTextCursor.MoveMode.KeepAnchor)
            selections.append(_selection(cursor, SNIPPET_COLOR))
            anchor = span[0] if anchor is None else anchor
        self.text.setExtraSelections(selections)
        cursor = QTextCursor(doc)
        cursor.setPosition(anchor or 0)
        self.text.setTextCursor(cursor)
        if anchor is not None:
            self.text.centerCursor()

    def highlighted(self) -> list[str]:
        """The texts marked now (cited lines, snippet), in order; for tests and accessibility."""
        return [
            s.cursor.selectedText().replace("\u2029", "\n") for s in self.text.extraSelections()
        ]


def _selection(
    cursor: QTextCursor, color: QColor, full_width: bool = False
) -> QTextEdit.ExtraSelection:
    selection = QTextEdit.ExtraSelection()
    selection.cursor = cursor
    fmt = QTextCharFormat()
    fmt.setBackground(color)
    if full_width:
        fmt.setProperty(QTextCharFormat.Property.FullWidthSelection, True)
    selection.format = fmt
    return selection


def _positive(value: object) -> int | None:
    """A 1-based number from a citation field, or None (missing, null, zero, garbage)."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
