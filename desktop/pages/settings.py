"""The settings page: where data lives, what is stored, privacy, audit log, appearance.

Folder sizes are summed on a worker (``ops.run``) when the page is first shown: a home
with large models or collections has many files, and walking them must not freeze the
window. The guard's status is read from ``engine.privacy.guard`` (process-wide state, a
dictionary lookup), the settings from ``engine.config`` (a small file) -- both quick
enough for the GUI thread.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication, QShowEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from engine.config import THEMES, load_config, update_config
from engine.errors import BastionError
from engine.jobs import JobContext
from engine.privacy import guard
from engine.privacy.audit import audit_log_path
from engine.units import human_size

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Engine

# What each size row counts, relative to the home.
AREAS: dict[str, tuple[str, ...]] = {
    "Database (conversations, document text, model list)": (
        "bastion.db",
        "bastion.db-wal",
        "bastion.db-shm",
    ),
    "Models": ("models",),
    "Fine-tuned adapters": ("adapters",),
    "Document collections (search indexes)": ("collections",),
    "Caches (converted embedders, training)": ("cache",),
    "Logs": ("logs",),
}

SCHEMES = {
    Qt.ColorScheme.Dark: "dark",
    Qt.ColorScheme.Light: "light",
    Qt.ColorScheme.Unknown: "not reported by the system",
}
_THEME_SCHEMES = {"system": Qt.ColorScheme.Unknown, "light": Qt.ColorScheme.Light,
                  "dark": Qt.ColorScheme.Dark}  # fmt: skip


def tree_size(path: Path) -> int:
    """Bytes in a file, or in every file below a folder (links are not followed)."""
    try:
        info = path.lstat()
    except OSError:
        return 0  # not there (yet): an empty area
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def area_sizes(home: Path, ctx: JobContext) -> dict[str, int]:
    sizes = {}
    for n, (area, parts) in enumerate(AREAS.items()):
        ctx.check_cancelled()
        ctx.report(n, len(AREAS), area)
        sizes[area] = sum(tree_size(home / part) for part in parts)
    return sizes


def guard_text() -> str:
    """The network guard's state in plain words."""
    offline_missing = [k for k, v in guard.OFFLINE_SWITCHES.items() if os.environ.get(k) != v]
    telemetry_missing = [k for k, v in guard.TELEMETRY_SWITCHES.items() if os.environ.get(k) != v]
    lines = [
        "Guard: active — connections to other machines are refused; only this computer "
        "is reachable."
        if guard.is_active()
        else "Guard: NOT active — restart Bastion to turn it on.",
        f"Offline switches of the Hugging Face libraries: all {len(guard.OFFLINE_SWITCHES)} set"
        if not offline_missing
        else f"Offline switches NOT set: {', '.join(offline_missing)}",
        f"Telemetry switches: all {len(guard.TELEMETRY_SWITCHES)} off"
        if not telemetry_missing
        else f"Telemetry switches NOT off: {', '.join(telemetry_missing)}",
    ]
    blocked = guard.blocked_attempts()
    if blocked:
        last = blocked[-1]
        lines.append(
            f"Blocked since Bastion started: {len(blocked)} — the last one, to "
            f"{last.target}, by {last.caller}"
        )
    else:
        lines.append("Blocked since Bastion started: none (nothing tried to connect)")
    return "\n".join(lines)


PRIVACY_STATEMENT = """\
<p><b>Nothing leaves this machine.</b> Bastion runs models with llama.cpp on this
computer. A network guard refuses every connection to another machine unless you ask
for a download in that action, and the telemetry of the libraries it uses is switched
off.</p>
<ul>
<li><b>bastion.db</b> — your conversations (questions, answers, timings), the text of
the documents you add to collections with their file paths, and the list of models with
their settings.</li>
<li><b>models/</b> — model files you imported with “copy”; others stay where they are
and only their path is recorded.</li>
<li><b>adapters/</b> — fine-tuned adapters and their training runs.</li>
<li><b>collections/</b> — search indexes, rebuilt from the database when needed.</li>
<li><b>cache/</b> — embedding models converted for this machine and training caches,
made again when needed.</li>
<li><b>logs/</b> — technical events (errors, timings). Never your questions, answers or
document text — unless you turn on the audit log below.</li>
<li><b>config.toml</b> — these settings, never secrets. Secrets (tokens) go to the
system keyring; where there is none, to an encrypted file in <b>secrets/</b>.</li>
</ul>"""


class SettingsPage(QWidget):
    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self.home = Path(engine.home)
        self.sizes: dict[str, int] | None = None
        self._sizes_op: ops.Operation | None = None
        config = load_config(self.home)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        layout = QVBoxLayout(body)
        layout.addWidget(QLabel("<h2>Settings</h2>"))

        # Where data lives
        data_box = QGroupBox("Where your data lives")
        data = QVBoxLayout(data_box)
        row = QHBoxLayout()
        self.home_label = _selectable(str(self.home))
        self.open_button = QPushButton("Open folder")
        self.open_button.clicked.connect(self.open_home)
        row.addWidget(self.home_label, 1)
        row.addWidget(self.open_button)
        data.addLayout(row)
        self.size_form = QFormLayout()
        self.size_labels = {area: QLabel("…") for area in AREAS}
        self.size_labels["Total"] = QLabel("…")
        for area, label in self.size_labels.items():
            self.size_form.addRow(area, label)
        data.addLayout(self.size_form)
        self.recount_button = QPushButton("Count again")
        self.recount_button.clicked.connect(self.refresh_sizes)
        data.addWidget(self.recount_button, 0, Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(data_box)

        # What is stored
        privacy_box = QGroupBox("What is stored, and where")
        self.privacy_label = QLabel(PRIVACY_STATEMENT)
        self.privacy_label.setWordWrap(True)
        self.privacy_label.setTextFormat(Qt.TextFormat.RichText)
        QVBoxLayout(privacy_box).addWidget(self.privacy_label)
        layout.addWidget(privacy_box)

        # The network guard
        guard_box = QGroupBox("Network guard")
        guard_layout = QVBoxLayout(guard_box)
        self.guard_label = _selectable("")
        guard_layout.addWidget(self.guard_label)
        self.guard_button = QPushButton("Check again")
        self.guard_button.clicked.connect(self.refresh_guard)
        guard_layout.addWidget(self.guard_button, 0, Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(guard_box)

        # The audit log
        audit_box = QGroupBox("Audit log")
        audit_layout = QVBoxLayout(audit_box)
        self.audit_box = QCheckBox("Keep an audit log of every question and answer")
        self.audit_box.setChecked(config.audit_log)
        self.audit_box.toggled.connect(self._on_audit_box_toggled)
        audit_layout.addWidget(self.audit_box)
        audit_help = QLabel(
            "When on, each chat answer is appended to "
            f"{audit_log_path(self.home)} as one line of JSON: the time, the model, the "
            "conversation, the system prompt, your question and the full answer. The file "
            "is readable by your user account only. When off, nothing is written there; "
            "turning it off keeps what was already recorded until you delete the file."
        )
        audit_help.setWordWrap(True)
        audit_layout.addWidget(audit_help)
        layout.addWidget(audit_box)

        # Appearance
        look_box = QGroupBox("Appearance")
        look = QFormLayout(look_box)
        self.theme_combo = QComboBox()
        for theme in THEMES:
            self.theme_combo.addItem(theme.capitalize(), theme)
        self.theme_combo.setCurrentIndex(THEMES.index(config.theme))
        self.theme_combo.currentIndexChanged.connect(self._on_theme_combo_changed)
        look.addRow("Colour scheme", self.theme_combo)
        self.scheme_label = QLabel()
        look.addRow("Now showing", self.scheme_label)
        layout.addWidget(look_box)
        layout.addStretch(1)

        hints = QGuiApplication.styleHints()
        hints.colorSchemeChanged.connect(self._show_scheme)
        if config.theme != "system":
            hints.setColorScheme(_THEME_SCHEMES[config.theme])
        self._show_scheme()
        self.refresh_guard()

    # -- data --------------------------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.refresh_guard()
        if self.sizes is None and self._sizes_op is None:
            self.refresh_sizes()

    def refresh_sizes(self) -> None:
        """Sum the folders' sizes off the GUI thread."""
        if self._sizes_op is not None:
            return
        for label in self.size_labels.values():
            label.setText("counting…")
        self.recount_button.setEnabled(False)
        home = self.home
        self._sizes_op = ops.run(
            lambda ctx: area_sizes(home, ctx),
            on_success=self._on_sizes,
            on_failure=self.window_.show_error,
            on_finished=self._on_sizes_finished,
            parent=self,
            name="folder-sizes",
        )

    def _on_sizes(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        for area, size in sizes.items():
            self.size_labels[area].setText(human_size(size))
        self.size_labels["Total"].setText(human_size(sum(sizes.values())))

    def _on_sizes_finished(self) -> None:
        self._sizes_op = None
        self.recount_button.setEnabled(True)

    @property
    def busy(self) -> bool:
        return self._sizes_op is not None

    def open_home(self) -> None:
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.home))):
            self.window_.notify(f"No file manager could be opened. The folder is {self.home}")

    # -- privacy -----------------------------------------------------------------------

    def refresh_guard(self) -> None:
        self.guard_label.setText(guard_text())

    def _on_audit_box_toggled(self, checked: bool) -> None:
        try:
            update_config(self.home, audit_log=checked)
        except (BastionError, OSError) as exc:
            self.audit_box.blockSignals(True)
            self.audit_box.setChecked(not checked)
            self.audit_box.blockSignals(False)
            self.window_.show_error(exc)
            return
        if checked:
            self.window_.notify(
                f"Audit log on: questions and answers are recorded in {audit_log_path(self.home)}"
            )
        else:
            self.window_.notify("Audit log off: questions and answers are no longer recorded.")

    # -- appearance --------------------------------------------------------------------

    def _on_theme_combo_changed(self, index: int) -> None:
        theme = str(self.theme_combo.itemData(index))
        try:
            update_config(self.home, theme=theme)
        except (BastionError, OSError) as exc:
            self.window_.show_error(exc)
            return
        # Unknown hands the choice back to the system.
        QGuiApplication.styleHints().setColorScheme(_THEME_SCHEMES[theme])
        self._show_scheme()

    def _show_scheme(self) -> None:
        scheme = SCHEMES.get(QGuiApplication.styleHints().colorScheme(), "unknown")
        theme = str(self.theme_combo.currentData())
        how = "following the system" if theme == "system" else f"chosen here ({theme})"
        self.scheme_label.setText(f"{scheme.capitalize()}, {how}")


def _selectable(text: str) -> QLabel:
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)  # paths and caller names may hold '<'
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label
