"""The right side of the Documents page: one collection's summary, actions, progress and files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QModelIndex, Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from desktop.documents.files import (
    CHUNKS,
    FILE,
    FOLDER,
    PAGES,
    PATH_ROLE,
    STATE,
    FilesFilter,
    FilesModel,
    describe,
)
from desktop.documents.progress import IndexingProgress

if TYPE_CHECKING:
    from engine import Collection, Document

DROP_HINT = "Drop files or folders here to add them to this collection."


def summary_text(collection: Collection, summary: dict[str, int]) -> str:
    """ "4 files · 3 indexed · 1 failed · 17 chunks" (states with no file are left out)."""
    parts = [f"{summary.get('files', 0)} files"]
    for state in ("indexed", "pending", "failed", "skipped"):
        if summary.get(state):
            word = "waiting" if state == "pending" else state
            parts.append(f"{summary[state]} {word}")
    parts.append(f"{summary.get('chunks', 0)} chunks")
    text = " · ".join(parts) + f"   (embedder: {collection.embedder})"
    if summary.get("outdated"):
        text += "\nIndexed by an older Bastion: Sync indexes it again for better search."
    return text


class CollectionPanel(QWidget):
    """Widgets only: the page connects the buttons and fills it with what the engine read."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel()
        self.title.setTextFormat(Qt.TextFormat.PlainText)
        font = self.title.font()
        font.setPointSizeF(font.pointSizeF() * 1.3)
        font.setBold(True)
        self.title.setFont(font)
        self.summary = QLabel()
        layout.addWidget(self.title)
        layout.addWidget(self.summary)

        actions = QHBoxLayout()
        self.add_files_button = QPushButton("Add files…")
        self.add_folder_button = QPushButton("Add folder…")
        self.sync_button = QPushButton("Sync")
        self.sync_button.setToolTip("Index what changed in the added files and folders")
        self.remove_button = QPushButton("Remove collection…")
        self.remove_button.setToolTip("Remove the collection and its index (your files stay)")
        for button in (self.add_files_button, self.add_folder_button, self.sync_button):
            actions.addWidget(button)
        actions.addStretch(1)
        actions.addWidget(self.remove_button)
        layout.addLayout(actions)

        self.progress = IndexingProgress()
        layout.addWidget(self.progress)

        self.problems_only = QCheckBox("Show only files with problems")
        layout.addWidget(self.problems_only)
        self.files = FilesModel()
        self.files_view = FilesFilter()
        self.files_view.setSourceModel(self.files)
        self.problems_only.toggled.connect(self.files_view.set_problems_only)
        self.table = QTableView()
        self.table.setAccessibleName("Files of the collection")
        self.table.setModel(self.files_view)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # the engine's order: by path
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)  # the problem, the longest text
        for column, width in ((FILE, 200), (STATE, 76), (CHUNKS, 60), (PAGES, 52), (FOLDER, 180)):
            header.resizeSection(column, width)
        self.table.selectionModel().currentRowChanged.connect(self.show_current_details)
        layout.addWidget(self.table, 1)
        self.details = QLabel()
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.details)
        self.drop_hint = QLabel(DROP_HINT)
        self.drop_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.drop_hint.setEnabled(False)  # drawn muted: a hint, not a control
        layout.addWidget(self.drop_hint)

    def show_collection(
        self, collection: Collection, summary: dict[str, int], documents: list[Document]
    ) -> None:
        self.title.setText(collection.name)
        self.summary.setText(summary_text(collection, summary))
        self.files.set_documents(documents)
        self.show_current_details()

    def clear(self, name: str | None) -> None:
        """Another collection was picked: its name now, its files once they are read."""
        self.title.setText(name or "")
        self.summary.setText("")
        self.files.set_documents([])
        self.details.setText("")

    def current_path(self) -> str | None:
        path = self.table.currentIndex().data(PATH_ROLE)
        return str(path) if path else None

    def show_current_details(self, *_: QModelIndex) -> None:
        """The selected file in words under the table: its state and, for problems, why."""
        path = self.current_path()
        doc = next((d for d in self.files.documents if d.path == path), None)
        self.details.setText(describe(doc) if doc is not None else "")

    def show_drop_target(self, target: str | None) -> None:
        """Mark the page as a drop target for collection ``target``; None: back to the hint."""
        if target is None:
            self.drop_hint.setText(DROP_HINT)
            self.drop_hint.setStyleSheet("")
            self.drop_hint.setEnabled(False)
        else:
            self.drop_hint.setText(f"Release to add to {target}")
            self.drop_hint.setStyleSheet("border: 2px dashed palette(highlight); padding: 8px;")
            self.drop_hint.setEnabled(True)
