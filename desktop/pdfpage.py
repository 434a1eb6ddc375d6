"""A rendered PDF page (QtPdf, from PySide6-Addons) with the cited passage highlighted.

The source viewer shows it beside the page's text when QtPdf can be imported; where it
cannot (a trimmed install), ``available()`` is False and only the text is shown.
"""

from __future__ import annotations

import functools
from typing import Any

from PySide6.QtWidgets import QVBoxLayout, QWidget


@functools.cache
def available() -> bool:
    try:
        from PySide6.QtPdf import QPdfDocument  # noqa: F401
        from PySide6.QtPdfWidgets import QPdfView  # noqa: F401
    except ImportError:
        return False
    return True


class PdfPage(QWidget):
    """One PDF file, shown a page at a time, fitted to the width."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from PySide6.QtPdf import QPdfDocument, QPdfSearchModel
        from PySide6.QtPdfWidgets import QPdfView

        self.document = QPdfDocument(self)
        self.search = QPdfSearchModel(self)
        self.search.setDocument(self.document)
        self.view: Any = QPdfView(self)
        self.view.setDocument(self.document)
        self.view.setPageMode(QPdfView.PageMode.SinglePage)
        self.view.setZoomMode(QPdfView.ZoomMode.FitToWidth)
        self.view.setSearchModel(self.search)
        self.view.setAccessibleName("PDF page")
        self.path = ""
        self._wanted_page = 0
        # Results arrive page by page; the one on the cited page becomes the current one.
        self.search.countChanged.connect(self._pick_result)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view)

    def show_page(self, path: str, page: int, snippet: str = "") -> bool:
        """Show 1-based ``page`` of ``path``; highlight the snippet's start. False if unreadable."""
        from PySide6.QtPdf import QPdfDocument

        if path != self.path:
            self.document.close()
            if self.document.load(path) != QPdfDocument.Error.None_:
                self.path = ""
                return False
            self.path = path
        index = min(max(page - 1, 0), max(self.document.pageCount() - 1, 0))
        self._wanted_page = index
        self.view.pageNavigator().jump(index, self.view.pageNavigator().currentLocation())
        words = snippet.split()
        self.search.setSearchString(" ".join(words[:6]))
        return True

    def _pick_result(self) -> None:
        from PySide6.QtCore import QModelIndex

        for i in range(self.search.rowCount(QModelIndex())):
            if self.search.resultAtIndex(i).page() == self._wanted_page:
                if self.view.currentSearchResultIndex() != i:
                    self.view.setCurrentSearchResultIndex(i)
                    self.view.pageNavigator().jump(self.search.resultAtIndex(i))
                return

    @property
    def current_page(self) -> int:
        """The 1-based page shown."""
        return int(self.view.pageNavigator().currentPage()) + 1
