"""The per-file table of a collection: state, chunks, pages and, for failures, why and what to do.

The engine stores one plain message per document that could not be indexed ("corrupt PDF:
…", "unsupported file type (.xyz)"). ``explain`` adds what the user can do about it; the
table shows the message in its Problem column and both in the row's tooltip.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QColor

if TYPE_CHECKING:
    from engine import Document

ModelIndex = QModelIndex | QPersistentModelIndex

PATH_ROLE = Qt.ItemDataRole.UserRole + 1
STATE_ROLE = Qt.ItemDataRole.UserRole + 2
SORT_ROLE = Qt.ItemDataRole.UserRole + 3

COLUMNS = ("File", "State", "Chunks", "Pages", "Folder", "Problem")
FILE, STATE, CHUNKS, PAGES, FOLDER, PROBLEM = range(len(COLUMNS))

STATE_TITLES = {
    "indexed": "Indexed",
    "pending": "Waiting",
    "failed": "Failed",
    "skipped": "Skipped",
}
# Readable on both light and dark Fusion palettes.
STATE_COLORS = {"failed": "#d9534f", "skipped": "#b8860b", "pending": "#4a90d9"}

# (start of the engine's message, what the user can do). The first match wins.
_ADVICE = (
    ("no such file or folder", "It was moved or deleted. Add it again from where it is now."),
    ("file not found", "It was moved or deleted. Sync the collection to drop it."),
    ("cannot read: permission", "Bastion may not read it: check the file's permissions."),
    ("cannot read", "The file could not be read; check that the drive is available."),
    (
        "unsupported file type",
        "Bastion reads PDF, Word (.docx), Markdown, HTML, plain-text and code files.",
    ),
    ("the file changed", "It was being written to; sync again when it is saved."),
    ("empty file", "The file is empty; there is nothing to search."),
    ("no text", "The file holds no text to search."),
    ("binary data", "The name says text, but the content is binary (not a document)."),
    ("corrupt docx", "The Word file is damaged: open and save it again in Word, then sync."),
    (
        "encrypted pdf",
        "Save a copy without the password (e.g. print to PDF) and add that instead.",
    ),
    (
        "corrupt pdf",
        "The PDF is damaged or not really a PDF: re-download or re-export it, then sync.",
    ),
    (
        "pdf has no text layer",
        "It is probably a scan: an OCR tool such as ocrmypdf makes a searchable copy.",
    ),
    ("not a regular file", "Only ordinary files can be indexed."),
)


def explain(error: str | None) -> str:
    """What the user can do about a document's error message; "" when there is no advice."""
    if not error:
        return ""
    low = error.lower()
    return next((advice for start, advice in _ADVICE if low.startswith(start)), "")


def describe(doc: Document) -> str:
    """One document in words, for the tooltip and the details line under the table."""
    title = STATE_TITLES.get(doc.state, doc.state)
    if doc.state == "indexed":
        pages = f", {doc.pages} pages" if doc.pages else ""
        return f"{doc.path}\n{title}: {doc.chunk_count} chunks{pages}."
    if doc.state == "pending":
        return f"{doc.path}\n{title} to be indexed. Sync the collection to index it."
    reason = (doc.error or "no reason given").rstrip(".")
    advice = explain(doc.error)
    return f"{doc.path}\n{title}: {reason}." + (f"\n{advice}" if advice else "")


class FilesModel(QAbstractTableModel):
    """The documents of one collection, in the engine's order (by path)."""

    def __init__(self) -> None:
        super().__init__()
        self._docs: list[Document] = []

    @property
    def documents(self) -> list[Document]:
        return list(self._docs)

    def set_documents(self, docs: list[Document]) -> None:
        """Show ``docs``; when the same files are shown, update in place (keeps the selection)."""
        if [d.path for d in docs] == [d.path for d in self._docs] and docs:
            self._docs = list(docs)
            self.dataChanged.emit(self.index(0, 0), self.index(len(docs) - 1, len(COLUMNS) - 1))
            return
        self.beginResetModel()
        self._docs = list(docs)
        self.endResetModel()

    def rowCount(self, parent: ModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._docs)

    def columnCount(self, parent: ModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def data(self, index: ModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._docs):
            return None
        doc = self._docs[index.row()]
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(doc, column)
        if role == SORT_ROLE:
            if column == CHUNKS:
                return doc.chunk_count
            if column == PAGES:
                return doc.pages or 0
            return self._display(doc, column)
        if role == Qt.ItemDataRole.ToolTipRole:
            return describe(doc)
        if role == Qt.ItemDataRole.ForegroundRole and column in (STATE, PROBLEM):
            color = STATE_COLORS.get(doc.state)
            return QColor(color) if color else None
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (CHUNKS, PAGES):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == PATH_ROLE:
            return doc.path
        if role == STATE_ROLE:
            return doc.state
        return None

    @staticmethod
    def _display(doc: Document, column: int) -> str:
        if column == FILE:
            return os.path.basename(doc.path)
        if column == STATE:
            return STATE_TITLES.get(doc.state, doc.state)
        if column == CHUNKS:
            return str(doc.chunk_count) if doc.state == "indexed" else ""
        if column == PAGES:
            return str(doc.pages) if doc.pages else ""
        if column == FOLDER:
            return os.path.dirname(doc.path)
        return doc.error or ""


class FilesFilter(QSortFilterProxyModel):
    """Sorting by any column, and "problems only" (failed and skipped files)."""

    def __init__(self) -> None:
        super().__init__()
        self.setSortRole(SORT_ROLE)
        self._problems_only = False

    def set_problems_only(self, on: bool) -> None:
        self.beginFilterChange()
        self._problems_only = on
        self.endFilterChange()

    def filterAcceptsRow(self, source_row: int, source_parent: ModelIndex) -> bool:
        if not self._problems_only:
            return True
        state = self.sourceModel().index(source_row, 0, source_parent).data(STATE_ROLE)
        return state in ("failed", "skipped")
