"""The main window: a sidebar of pages (Chat, Documents, Models, Fine-tune, Server, Settings).

``bastion-desktop`` starts here. Start-up stays light: the engine facade opens the
database and the registry only; torch, transformers, sentence-transformers and faiss are
imported by the engine when a page first needs them, on a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from PySide6.QtCore import QEvent, QEventLoop, QObject, Qt, QTimer
from PySide6.QtGui import QCloseEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from desktop.collector import GuiThreadCollector

if TYPE_CHECKING:
    from engine import Engine

log = logging.getLogger(__name__)

NOTICE_MS = 8000
CLOSE_WAIT_S = 10.0


class Notice(QWidget):
    """A non-modal message strip at the top of the window; hides itself after a while."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("notice")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 6, 6)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.PlainText)  # messages quote file names
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("×")
        close.setFlat(True)
        close.setFixedWidth(28)
        close.setAccessibleName("Dismiss message")
        close.clicked.connect(self.hide)
        layout.addWidget(self.label, 1)
        layout.addWidget(close)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.hide)
        self.hide()

    def show_message(self, text: str, kind: str = "info") -> None:
        colors = {"info": "#2d6cdf", "error": "#c0392b", "success": "#2e8b57"}
        self.setStyleSheet(f"#notice {{ border-left: 4px solid {colors.get(kind, '#2d6cdf')}; }}")
        self.label.setText(text)
        self.show()
        self._timer.start(NOTICE_MS if kind != "error" else 2 * NOTICE_MS)


class MainWindow(QMainWindow):
    PAGES = ("Chat", "Documents", "Models", "Fine-tune", "Compare", "Server", "Settings")

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.collector = GuiThreadCollector(self)
        # A failure that no page handles is shown here, never lost (see desktop/ops.py).
        ops.set_failure_handler(self.show_error, owner=self)
        self.setWindowTitle("Bastion")
        self.resize(1180, 760)
        central = QWidget()
        outer = QVBoxLayout(central)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        self.notice = Notice()
        outer.addWidget(self.notice)
        body = QHBoxLayout()
        body.setContentsMargins(0, 0, 0, 0)
        outer.addLayout(body, 1)
        self.sidebar = QListWidget()
        self.sidebar.setObjectName("sidebar")
        self.sidebar.setFixedWidth(150)
        self.sidebar.setAccessibleName("Pages")
        self.stack = QStackedWidget()
        body.addWidget(self.sidebar)
        body.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        from desktop.pages.chat import ChatPage
        from desktop.pages.compare import ComparePage
        from desktop.pages.documents import DocumentsPage
        from desktop.pages.finetune import FinetunePage
        from desktop.pages.models import ModelsPage
        from desktop.pages.server import ServerPage
        from desktop.pages.settings import SettingsPage

        self.chat = ChatPage(engine, self)
        self.documents = DocumentsPage(engine, self)
        self.models = ModelsPage(engine, self)
        self.finetune = FinetunePage(engine, self)
        self.compare = ComparePage(engine, self)
        self.server = ServerPage(engine, self)
        self.settings = SettingsPage(engine, self)
        for title, page in zip(
            self.PAGES,
            (
                self.chat,
                self.documents,
                self.models,
                self.finetune,
                self.compare,
                self.server,
                self.settings,
            ),
            strict=True,
        ):
            self.stack.addWidget(page)
            QListWidgetItem(title, self.sidebar)
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)
        self.sidebar.setCurrentRow(0)
        for key, page_index in (("Ctrl+1", 0), ("Ctrl+2", 1), ("Ctrl+3", 2), ("Ctrl+4", 3)):
            QShortcut(QKeySequence(key), self, lambda i=page_index: self.show_page(i))

    def show_page(self, index: int | str) -> None:
        if isinstance(index, str):
            index = self.PAGES.index(index)
        self.sidebar.setCurrentRow(index)

    def notify(self, text: str, kind: str = "info") -> None:
        """A plain-words message that does not block (errors stay longer)."""
        self.notice.show_message(text, kind)

    def show_error(self, exc: BaseException) -> None:
        """An engine error as a message (its text and hint); anything else is a bug, also
        logged. A cancellation is a normal end: nothing is shown."""
        from engine import BastionError, Cancelled

        if isinstance(exc, Cancelled):
            return
        if isinstance(exc, BastionError):
            self.notify(str(exc), "error")
        else:
            log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
            self.notify(f"Something went wrong: {type(exc).__name__}: {exc}", "error")

    def closeEvent(self, event: QCloseEvent) -> None:
        """Cancel what is running and give it a moment to stop cleanly.

        An answer being written is kept (marked interrupted); a training run saves a
        checkpoint when it can, and otherwise its child notices the app is gone (its
        stdin closes), saves one and stops: ``--resume`` or Resume continues it.
        """
        self.server.shutdown()
        running = list(ops.running())
        for op in running:
            op.cancel()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while any(op.running for op in running) and time.monotonic() < deadline:
            QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.02)
        super().closeEvent(event)

    def open_chat_with(self, model_id: str) -> None:
        """Start a new chat with ``model_id`` (e.g. a fine-tune that just finished)."""
        self.chat.new_chat(model_id)
        self.show_page("Chat")

    def open_compare_with(self, model_id: str, against: str) -> None:
        """Compare ``model_id`` blind with ``against`` (a fine-tune and what it improves on)."""
        self.compare.choose(against, model_id)
        self.show_page("Compare")


def install_crash_handler(app: QApplication) -> Callable[..., None]:
    """Unexpected exceptions in slots are logged and shown in a dialog; the app goes on."""

    def handler(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            app.quit()
            return
        text = "".join(traceback.format_exception(kind, exc, tb))
        log.error("unexpected exception in the GUI:\n%s", text)
        box = QMessageBox(QMessageBox.Icon.Critical, "Bastion — unexpected error",
                          f"{kind.__name__}: {exc}\n\nThe details are in the log file. "
                          "Bastion keeps running.")  # fmt: skip
        box.setDetailedText(text)
        box.setModal(False)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.show()

    sys.excepthook = handler
    return handler


class _FirstPaint(QObject):
    """For bench/bench_desktop.py: the time of the window's first paint, then idle memory."""

    def __init__(self, app: QApplication, window: QWidget) -> None:
        super().__init__(window)
        self.app = app
        self.painted: float | None = None

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if self.painted is None and event.type() == QEvent.Type.Paint:
            self.painted = time.time()
            QTimer.singleShot(int(os.environ.get("BASTION_DESKTOP_IDLE_MS", "3000")), self.report)
        return False

    def report(self) -> None:
        import psutil

        rss = psutil.Process().memory_info().rss
        sys.stdout.write(json.dumps({"painted_at": self.painted, "idle_rss": rss}) + "\n")
        sys.stdout.flush()
        self.app.quit()


def _probe_first_paint(app: QApplication, window: QWidget) -> None:
    probe = _FirstPaint(app, window)
    window.installEventFilter(probe)


def main(argv: list[str] | None = None) -> int:
    app = QApplication.instance() or QApplication(sys.argv if argv is None else argv)
    assert isinstance(app, QApplication)
    app.setApplicationName("Bastion")
    app.setOrganizationName("Bastion")
    app.setStyle("Fusion")  # follows the system's light or dark scheme
    install_crash_handler(app)
    from engine import BastionError, Engine

    try:
        # The embedder's one-time int8 export imports torch: keep it out of this process.
        engine = Engine(embedder_export_in_child=True)
    except BastionError as exc:
        QMessageBox.critical(None, "Bastion cannot start", str(exc))
        return 1
    window = MainWindow(engine)
    if os.environ.get("BASTION_DESKTOP_PROBE"):
        _probe_first_paint(app, window)
    window.show()
    # After the first paint: the native libraries, on this thread (see desktop/ops.py).
    QTimer.singleShot(250, ops.preload_native)
    try:
        return app.exec()
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
