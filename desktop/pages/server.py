"""The Server page: serve this machine's models to the office over the OpenAI API.

Start and stop the server (``Engine.start_server``: on this computer only, or on every
address of the office network, which needs keys), see its address, make API keys (each
shown once, with a Copy button, then kept only as a hash), revoke them, and watch the
requests as they come: running, served, refused for a limit (429), and the latest ones.
Every engine call runs off the GUI thread (desktop/ops.py); the activity is read once a
second while the server runs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from desktop import ops

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Engine, ServerHandle, ServerStatus

ADDRESSES = (
    ("This computer only (127.0.0.1)", "127.0.0.1"),
    ("The office network (every address of this computer)", "0.0.0.0"),
)
KEY_COLUMNS = ["Name", "Starts with", "Requests/min", "Tokens/min", "Models", "Last used"]
ACTIVITY_COLUMNS = ["Time", "Key", "Model", "Endpoint", "Status", "ms"]
POLL_MS = 1000


class ServerPage(QWidget):
    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self.server: ServerHandle | None = None
        self._served = 0
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Server</h2>"))
        intro = QLabel(
            "Colleagues' tools that speak the OpenAI API (scripts, LangChain, editors, curl) "
            "can use this computer's models, fine-tunes and collections (as rag:NAME). "
            "Every request needs an API key; nothing is sent anywhere."
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)

        box = QGroupBox("Serve")
        row = QHBoxLayout(box)
        self.address = QComboBox()
        for label, host in ADDRESSES:
            self.address.addItem(label, host)
        self.address.setAccessibleName("Listen on")
        self.port = QSpinBox()
        self.port.setRange(1024, 65535)
        self.port.setValue(8765)
        self.port.setAccessibleName("Port")
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        row.addWidget(QLabel("Listen on"))
        row.addWidget(self.address, 1)
        row.addWidget(QLabel("port"))
        row.addWidget(self.port)
        row.addWidget(self.start_button)
        row.addWidget(self.stop_button)
        layout.addWidget(box)
        self.state = QLabel("Stopped.")
        self.state.setWordWrap(True)
        self.state.setTextInteractionFlags(self.state.textInteractionFlags().TextSelectableByMouse)
        layout.addWidget(self.state)

        keys = QGroupBox("API keys")
        keys_layout = QVBoxLayout(keys)
        self.keys = QTreeWidget()
        self.keys.setHeaderLabels(KEY_COLUMNS)
        self.keys.setRootIsDecorated(False)
        self.keys.setAccessibleName("API keys")
        self.keys.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        keys_layout.addWidget(self.keys)
        make = QHBoxLayout()
        self.key_name = QLineEdit()
        self.key_name.setPlaceholderText("name, e.g. alice-laptop")
        self.key_name.setAccessibleName("New key's name")
        self.rpm = QSpinBox()
        self.rpm.setRange(0, 100_000)
        self.rpm.setSpecialValueText("no limit")
        self.rpm.setAccessibleName("Requests per minute")
        self.tpm = QSpinBox()
        self.tpm.setRange(0, 10_000_000)
        self.tpm.setSingleStep(1000)
        self.tpm.setSpecialValueText("no limit")
        self.tpm.setAccessibleName("Tokens per minute")
        self.create_button = QPushButton("Create key")
        self.create_button.clicked.connect(self.create_key)
        self.revoke_button = QPushButton("Revoke")
        self.revoke_button.clicked.connect(self.revoke_key)
        for widget in (
            self.key_name,
            QLabel("req/min"),
            self.rpm,
            QLabel("tokens/min"),
            self.tpm,
            self.create_button,
            self.revoke_button,
        ):
            make.addWidget(widget)
        keys_layout.addLayout(make)
        shown = QHBoxLayout()
        self.new_key = QLineEdit()
        self.new_key.setReadOnly(True)
        self.new_key.setAccessibleName("The new key")
        self.copy_button = QPushButton("Copy")
        self.copy_button.clicked.connect(self.copy_key)
        self.new_key_note = QLabel()
        self.new_key_note.setWordWrap(True)
        shown.addWidget(self.new_key, 1)
        shown.addWidget(self.copy_button)
        keys_layout.addLayout(shown)
        keys_layout.addWidget(self.new_key_note)
        self._show_new_key(None)
        layout.addWidget(keys)

        activity = QGroupBox("Activity")
        activity_layout = QVBoxLayout(activity)
        self.counts = QLabel("Running 0 · served 0 · refused for a limit (429) 0")
        activity_layout.addWidget(self.counts)
        self.recent = QTreeWidget()
        self.recent.setHeaderLabels(ACTIVITY_COLUMNS)
        self.recent.setRootIsDecorated(False)
        self.recent.setAccessibleName("Recent requests")
        self.recent.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        activity_layout.addWidget(self.recent)
        layout.addWidget(activity, 1)

        self.key_list = ops.Refresher(
            lambda: lambda _ctx: self.engine.api_keys.list(),
            self._show_keys,
            parent=self,
            name="list keys",
        )
        self.key_list.refresh()
        self.poll = QTimer(self)
        self.poll.setInterval(POLL_MS)
        self.poll.timeout.connect(self.read_status)

    # -- serving ----------------------------------------------------------------------

    def start(self) -> None:
        host, port = str(self.address.currentData()), self.port.value()
        self.start_button.setEnabled(False)
        self.state.setText(f"Starting on {host}:{port}…")
        ops.run(
            lambda _ctx: self.engine.start_server(host, port),
            on_success=self._started,
            on_failure=self._not_started,
            parent=self,
            name="start server",
        )

    def _started(self, server: ServerHandle) -> None:
        self.server = server
        self.stop_button.setEnabled(True)
        self.address.setEnabled(False)
        self.port.setEnabled(False)
        where = (
            "this computer only"
            if server.url.startswith(("http://127.", "https://127."))
            else "every address of this computer: the office network can reach it"
        )
        self.state.setText(
            f"Serving <b>{server.url}</b> on {where}. Clients send "
            "<code>Authorization: Bearer KEY</code> (the OpenAI clients' api_key)."
        )
        self.poll.start()

    def _not_started(self, exc: BaseException) -> None:
        self.start_button.setEnabled(True)
        hint = getattr(exc, "hint", None)
        self.state.setText(f"Not started: {exc}" + (f" — {hint}" if hint else ""))

    def stop(self) -> None:
        server, self.server = self.server, None
        self.poll.stop()
        self.stop_button.setEnabled(False)
        if server is None:
            return
        self.state.setText("Stopping…")
        ops.run(
            lambda _ctx: server.stop(),
            on_finished=self._stopped,
            parent=self,
            name="stop server",
            native=False,
        )

    def _stopped(self) -> None:
        self.state.setText("Stopped.")
        self.start_button.setEnabled(True)
        self.address.setEnabled(True)
        self.port.setEnabled(True)

    def shutdown(self) -> None:
        """The window closes: stop serving (in the caller's thread: nothing else runs)."""
        self.poll.stop()
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    def read_status(self) -> None:
        server = self.server
        if server is None:
            return
        ops.run(
            lambda _ctx: server.status(),
            on_success=self._show_status,
            parent=self,
            name="server status",
            native=False,
        )

    def _show_status(self, status: ServerStatus) -> None:
        if status.served != self._served:  # keys' "last used" moved on
            self._served = status.served
            self.key_list.refresh()
        self.counts.setText(
            f"Running {status.running} · served {status.served} · "
            f"refused for a limit (429) {status.refused}"
        )
        self.recent.clear()
        for entry in status.recent:
            when = time.strftime("%H:%M:%S", time.localtime(entry["time"]))
            QTreeWidgetItem(
                self.recent,
                [
                    when,
                    entry["key"],
                    entry["model"],
                    entry["endpoint"],
                    str(entry["status"]),
                    str(entry["latency_ms"]),
                ],
            )

    # -- keys -------------------------------------------------------------------------

    def _show_keys(self, keys: list[Any]) -> None:
        self.keys.clear()
        for key in keys:
            QTreeWidgetItem(
                self.keys,
                [
                    key.name,
                    key.prefix + "…",
                    str(key.rpm or "–"),
                    str(key.tpm or "–"),
                    ", ".join(key.models) if key.models else "all",
                    key.last_used_at or "never",
                ],
            )

    def create_key(self) -> None:
        name = self.key_name.text().strip()
        rpm, tpm = self.rpm.value() or None, self.tpm.value() or None
        ops.run(
            lambda _ctx: self.engine.api_keys.create(name, rpm=rpm, tpm=tpm),
            on_success=self._created,
            parent=self,
            name="create key",
            native=False,
        )

    def _created(self, made: tuple[Any, str]) -> None:
        entry, key = made
        self.key_name.clear()
        self.rpm.setValue(0)
        self.tpm.setValue(0)
        self._show_new_key(key, entry.name)
        self.key_list.refresh()

    def _show_new_key(self, key: str | None, name: str = "") -> None:
        self.new_key.setText(key or "")
        for widget in (self.new_key, self.copy_button, self.new_key_note):
            widget.setVisible(key is not None)
        self.new_key_note.setText(
            f"The key “{name}”, shown only now: copy it and give it to its user. "
            "Bastion keeps only a hash of it."
        )

    def copy_key(self) -> None:
        QGuiApplication.clipboard().setText(self.new_key.text())
        self.new_key_note.setText("Copied. It will not be shown again.")

    def revoke_key(self) -> None:
        item = self.keys.currentItem()
        if item is None:
            return
        name = item.text(0)
        ops.run(
            lambda _ctx: self.engine.api_keys.revoke(name),
            on_success=lambda _entry: self.key_list.refresh(),
            parent=self,
            name="revoke key",
            native=False,
        )
