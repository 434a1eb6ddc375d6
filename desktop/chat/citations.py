"""Citation chips under an answer, and opening a cited source at the cited place.

A chip's click is a signal (``CitationChips.opened``) that the chat page, which holds the
engine, answers with ``open_citation``. That function is looked up on this module at
click time (never bound at import), so tests and other pages can replace it:
``monkeypatch.setattr(citations, "open_citation", f)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING

from PySide6.QtCore import QMargins, QPoint, QRect, QSize, Qt, Signal
from PySide6.QtWidgets import QLayout, QLayoutItem, QPushButton, QSizePolicy, QWidget

from engine import Citation

if TYPE_CHECKING:
    from engine import Engine

SNIPPET_TOOLTIP_CHARS = 400


def chip_text(citation: Citation) -> str:
    """``[2] report.pdf p.14`` or ``[3] notes.md L10–24``: number, file name, place."""
    name = PurePath(citation.path or "?").name
    text = f"[{citation.n}] {name}"
    page = citation.page
    start, end = citation.line_start, citation.line_end
    if page is not None:
        text += f" p.{page}"
    elif start is not None:
        text += f" L{start}" if end in (None, start) else f" L{start}–{end}"
    return text


def chip_tooltip(citation: Citation) -> str:
    snippet = citation.snippet
    if len(snippet) > SNIPPET_TOOLTIP_CHARS:
        snippet = snippet[: SNIPPET_TOOLTIP_CHARS - 1] + "…"
    return f"{citation.path}\n\n{snippet}".strip()


def open_citation(parent: QWidget, citation: Citation, engine: Engine) -> None:
    """Show the cited source at the cited page or lines (``desktop.viewer.show_source``).

    The viewer is imported here, on the first click, so the chat page does not pay for
    it at start.
    """
    from desktop.viewer import show_source

    show_source(parent, citation, engine)


class CitationChips(QWidget):
    """A row of small buttons, one per citation; a click emits ``opened(citation)``."""

    opened = Signal(object)  # Citation

    def __init__(self, citations: Sequence[Citation], parent: QWidget | None = None):
        super().__init__(parent)
        self.citations = list(citations)
        layout = FlowLayout(self, spacing=4)
        self.buttons: list[QPushButton] = []
        for citation in self.citations:
            button = QPushButton(chip_text(citation))
            button.setObjectName("citationChip")
            button.setToolTip(chip_tooltip(citation))
            button.setAccessibleName(f"Open source {chip_text(citation)}")
            button.setSizePolicy(QSizePolicy.Policy.Maximum, QSizePolicy.Policy.Fixed)
            button.clicked.connect(lambda _=False, c=citation: self.opened.emit(c))
            layout.addWidget(button)
            self.buttons.append(button)


class FlowLayout(QLayout):
    """Lays widgets out left to right and wraps to a new row (Qt's "flow layout" example).

    Six chips with file names do not fit one row of a narrow window; a flow keeps them
    all visible without a scroll bar.
    """

    def __init__(self, parent: QWidget | None = None, spacing: int = 4) -> None:
        super().__init__(parent)
        self._items: list[QLayoutItem] = []
        self._spacing = spacing
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item: QLayoutItem) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int) -> QLayoutItem | None:
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int) -> QLayoutItem | None:
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def expandingDirections(self) -> Qt.Orientation:
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._arrange(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._arrange(rect, move=True)

    def sizeHint(self) -> QSize:
        return self.minimumSize()

    def minimumSize(self) -> QSize:
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        margins: QMargins = self.contentsMargins()
        return size + QSize(margins.left() + margins.right(), margins.top() + margins.bottom())

    def _arrange(self, rect: QRect, *, move: bool) -> int:
        x, y, row_height = rect.x(), rect.y(), 0
        for item in self._items:
            hint = item.sizeHint()
            if x + hint.width() > rect.right() + 1 and row_height > 0:
                x, y = rect.x(), y + row_height + self._spacing
                row_height = 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self._spacing
            row_height = max(row_height, hint.height())
        return y + row_height - rect.y()
