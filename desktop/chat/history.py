"""The conversation list: search, new, rename, delete, export.

Everything here reaches the engine through ``desktop.ops`` (the GUI's threading rule):
the list is filled by a ``Refresher`` -- all conversations, or the hits of a full-text
search after a short pause in typing -- so only the newest answer is shown and a burst
of reloads costs two reads. Renaming, deleting and exporting are operations; the list
is read again when each ends, so it never stays out of step with the database.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from desktop import ops

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Conversation, Engine, JobContext, SearchHit

SEARCH_DELAY_MS = 200
UNTITLED = "Untitled chat"
ID_ROLE = Qt.ItemDataRole.UserRole
TITLE_ROLE = Qt.ItemDataRole.UserRole + 1
Row = tuple[int, str, str, str]  # (conversation id, title, label, tooltip)


class HistoryPanel(QWidget):
    """Past conversations, newest activity first, or the hits of a search."""

    conversation_selected = Signal(int)
    conversation_deleted = Signal(int)
    new_requested = Signal()

    def __init__(self, engine: Engine, window: MainWindow, parent: QWidget | None = None):
        super().__init__(parent)
        self.engine = engine
        self.window_ = window
        self._filling = False  # True while the list is rebuilt or relabelled by code
        self._open_id: int | None = None  # the conversation the page shows
        self.confirm_box: QMessageBox | None = None
        self._reader = ops.Refresher(
            self._read_job, self._show_rows, parent=self, name="history-read"
        )
        self.loaded = self._reader.shown  # the list shows what the database held just now

        self.search_box = QLineEdit()
        self.search_box.setPlaceholderText("Search chats (Ctrl+F)")
        self.search_box.setAccessibleName("Search conversations")
        self.search_box.setClearButtonEnabled(True)
        self.new_button = QPushButton("New chat")
        self.new_button.setToolTip("Start a new chat (Ctrl+N)")
        self.new_button.clicked.connect(self.new_requested)
        self.conversation_list = QListWidget()
        self.conversation_list.setAccessibleName("Conversations")
        self.conversation_list.setEditTriggers(QAbstractItemView.EditTrigger.EditKeyPressed)
        self.conversation_list.setWordWrap(True)
        self.conversation_list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.rename_button = QPushButton("Rename")
        self.export_button = QPushButton("Export…")
        self.delete_button = QPushButton("Delete")
        self.rename_button.clicked.connect(self.rename_selected)
        self.export_button.clicked.connect(self.export_selected)
        self.delete_button.clicked.connect(self.delete_selected)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 4, 8)
        layout.addWidget(self.search_box)
        layout.addWidget(self.new_button)
        layout.addWidget(self.conversation_list, 1)
        actions = QHBoxLayout()
        for button in (self.rename_button, self.export_button, self.delete_button):
            actions.addWidget(button)
        layout.addLayout(actions)

        # The same actions on the list's context menu, with keys that work in the list.
        self.conversation_list.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        for text, key, slot in (
            ("Rename", QKeySequence(Qt.Key.Key_F2), self.rename_selected),
            ("Export…", QKeySequence(), self.export_selected),
            ("Delete", QKeySequence(QKeySequence.StandardKey.Delete), self.delete_selected),
        ):
            action = QAction(text, self.conversation_list)
            action.setShortcut(key)
            action.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)
            action.triggered.connect(slot)
            self.conversation_list.addAction(action)

        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(SEARCH_DELAY_MS)
        self._search_timer.timeout.connect(self.reload)
        self.search_box.textChanged.connect(lambda _text: self._search_timer.start())
        self.conversation_list.currentItemChanged.connect(self._on_list_current_item_changed)
        self.conversation_list.itemChanged.connect(self._on_list_item_changed)
        self._update_buttons()

    # -- filling -----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether an engine call of this panel (a read, a rename, ...) is still running."""
        return bool(ops.running(self))

    @property
    def searching(self) -> bool:
        """Whether the list is being read (all conversations, or a search's hits)."""
        return self._reader.busy

    def reload(self, then: Callable[[], None] | None = None) -> None:
        """Show the list again: all conversations, or the search hits when searching.

        ``then`` runs once the list shows a read that began after this call.
        """
        self._reader.refresh(then)

    def _read_job(self) -> Callable[[JobContext], list[Row]]:
        engine, text = self.engine, self.search_box.text().strip()
        if not text:
            return lambda _ctx: self._conversation_rows(engine.list_conversations())
        return lambda _ctx: self._hit_rows(engine.search_history(text))

    @staticmethod
    def _conversation_rows(conversations: list[Conversation]) -> list[Row]:
        rows = []
        for c in conversations:
            tip = f"{c.message_count} messages · {c.model or 'no model'} · {c.updated_at[:16]}"
            rows.append((c.id, c.title or "", c.title or UNTITLED, tip))
        return rows

    @staticmethod
    def _hit_rows(hits: list[SearchHit]) -> list[Row]:
        rows = []
        seen = set()
        for hit in hits:  # best match first; one row per conversation
            if hit.conversation_id in seen:
                continue
            seen.add(hit.conversation_id)
            title = hit.conversation_title or ""
            snippet = " ".join(hit.snippet.split())
            rows.append((hit.conversation_id, title, f"{title or UNTITLED}\n{snippet}", snippet))
        return rows

    def _show_rows(self, rows: list[Row]) -> None:
        current = self._open_id
        self._filling = True
        self.conversation_list.blockSignals(True)
        try:
            self.conversation_list.clear()
            for conversation_id, title, label, tip in rows:
                item = QListWidgetItem(label, self.conversation_list)
                item.setData(ID_ROLE, conversation_id)
                item.setData(TITLE_ROLE, title)
                item.setToolTip(tip)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
                if conversation_id == current:
                    self.conversation_list.setCurrentItem(item)
        finally:
            self.conversation_list.blockSignals(False)
            self._filling = False
        self._update_buttons()

    # -- selection ---------------------------------------------------------------------

    def _current_item(self) -> QListWidgetItem | None:
        # Qt's stubs say currentItem() never returns None; with no current row it does.
        row = self.conversation_list.currentRow()
        return self.conversation_list.item(row) if row >= 0 else None

    def current_id(self) -> int | None:
        item = self._current_item()
        return int(item.data(ID_ROLE)) if item is not None else None

    def ids(self) -> list[int]:
        return [
            int(self.conversation_list.item(i).data(ID_ROLE))
            for i in range(self.conversation_list.count())
        ]

    def select(self, conversation_id: int | None) -> None:
        """Mark ``conversation_id`` as the open one, without announcing it."""
        self._open_id = conversation_id
        self.conversation_list.blockSignals(True)
        try:
            self.conversation_list.setCurrentRow(-1)
            for i in range(self.conversation_list.count()):
                if self.conversation_list.item(i).data(ID_ROLE) == conversation_id:
                    self.conversation_list.setCurrentRow(i)
                    break
        finally:
            self.conversation_list.blockSignals(False)
        self._update_buttons()

    def _on_list_current_item_changed(
        self, current: QListWidgetItem | None, _previous: QListWidgetItem | None
    ) -> None:
        self._update_buttons()
        if current is not None and not self._filling:
            self._open_id = int(current.data(ID_ROLE))
            self.conversation_selected.emit(int(current.data(ID_ROLE)))

    def _update_buttons(self) -> None:
        chosen = self._current_item() is not None
        for button in (self.rename_button, self.export_button, self.delete_button):
            button.setEnabled(chosen)

    # -- rename ------------------------------------------------------------------------

    def rename_selected(self) -> None:
        """Edit the title in place; Enter keeps it, Esc leaves it as it was."""
        item = self._current_item()
        if item is None:
            return
        self._filling = True
        item.setText(str(item.data(TITLE_ROLE) or ""))  # a search hit also shows a snippet
        self._filling = False
        self.conversation_list.editItem(item)

    def _on_list_item_changed(self, item: QListWidgetItem) -> None:
        if self._filling:
            return
        conversation_id = int(item.data(ID_ROLE))
        title = " ".join(item.text().split())
        if not title or title == item.data(TITLE_ROLE):
            # Later, not now: the list is in the middle of committing the editor's text.
            QTimer.singleShot(0, self.reload)
            return
        engine = self.engine
        ops.run(
            lambda _ctx: engine.rename_conversation(conversation_id, title),
            on_finished=self.reload,  # the stored title either way (failures are shown)
            parent=self,
            name="rename-conversation",
            native=False,
        )

    # -- delete ------------------------------------------------------------------------

    def delete_selected(self) -> None:
        """Ask (without blocking the window), then delete the conversation for good."""
        item = self._current_item()
        if item is None:
            return
        conversation_id = int(item.data(ID_ROLE))
        title = str(item.data(TITLE_ROLE) or UNTITLED)
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Delete chat",
            f"Delete “{title}” and all its messages? This cannot be undone.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            self,
        )
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        yes = box.button(QMessageBox.StandardButton.Yes)
        yes.setText("Delete")
        yes.clicked.connect(lambda: self.delete(conversation_id))
        self.confirm_box = box
        box.open()

    def delete(self, conversation_id: int) -> None:
        engine = self.engine

        def deleted(_: object) -> None:
            self.window_.notify("Chat deleted.")
            self.conversation_deleted.emit(conversation_id)

        ops.run(
            lambda _ctx: engine.delete_conversation(conversation_id),
            on_success=deleted,
            on_finished=self.reload,
            parent=self,
            name="delete-conversation",
            native=False,
        )

    # -- export ------------------------------------------------------------------------

    def export_selected(self) -> None:
        item = self._current_item()
        if item is None:
            return
        title = str(item.data(TITLE_ROLE) or f"chat-{item.data(ID_ROLE)}")
        safe = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in title).strip()
        path, _filter = QFileDialog.getSaveFileName(
            self,
            "Export chat",
            str(Path.home() / f"{safe or 'chat'}.md"),
            "Markdown (*.md);;JSON (*.json)",
        )
        if path:
            self.export_to(int(item.data(ID_ROLE)), Path(path))

    def export_to(self, conversation_id: int, path: Path) -> ops.Operation:
        """Write the conversation to ``path``: JSON for ``.json``, Markdown otherwise.

        Returns the operation; its ``succeeded`` carries the path written.
        """
        fmt = "json" if path.suffix.lower() == ".json" else "md"
        engine = self.engine

        def export(_ctx: JobContext) -> Path:
            text = engine.export_conversation(conversation_id, fmt)
            path.write_text(text, encoding="utf-8")
            return path

        def failed(exc: BaseException) -> None:
            if isinstance(exc, OSError):
                self.window_.notify(f"Could not write {path}: {exc.strerror or exc}", "error")
            else:
                self.window_.show_error(exc)

        return ops.run(
            export,
            on_success=lambda _: self.window_.notify(f"Exported to {path}", "success"),
            on_failure=failed,
            parent=self,
            name="export-conversation",
            native=False,
        )
