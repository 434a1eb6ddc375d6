"""The settings page: where data lives, what is stored, privacy, audit log, appearance.

Following the GUI's threading rule (desktop/ops.py), nothing here calls the engine on the
GUI thread. The home's disk use (``Engine.storage_usage``, a walk of many files), the
settings (``Engine.get_settings``) and the privacy status (``Engine.privacy_status``) are
read by operations; the switches show the settings once read and are disabled until
then, so that no click can write over a setting not yet shown. Each change is saved by
an operation through ``Engine.update_settings`` (which validates it), its switch disabled
meanwhile so that writes never overtake one another; a refused write puts the switch
back. The page listens to the engine's one change notification, so a setting changed
anywhere (another page, another process) shows here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl, Signal
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
from engine import (
    STORAGE_AREAS,
    THEMES,
    Config,
    JobContext,
    PrivacyStatus,
    StorageUsage,
    human_size,
)

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Engine

SCHEMES = {
    Qt.ColorScheme.Dark: "dark",
    Qt.ColorScheme.Light: "light",
    Qt.ColorScheme.Unknown: "not reported by the system",
}
_THEME_SCHEMES = {"system": Qt.ColorScheme.Unknown, "light": Qt.ColorScheme.Light,
                  "dark": Qt.ColorScheme.Dark}  # fmt: skip


def guard_text(status: PrivacyStatus) -> str:
    """The network guard's state in plain words."""
    lines = [
        "Guard: active — connections to other machines are refused; only this computer "
        "is reachable."
        if status.guard_active
        else "Guard: NOT active — restart Bastion to turn it on.",
        f"Offline switches of the Hugging Face libraries: all {status.offline_switches} set"
        if not status.offline_missing
        else f"Offline switches NOT set: {', '.join(status.offline_missing)}",
        f"Telemetry switches: all {status.telemetry_switches} off"
        if not status.telemetry_missing
        else f"Telemetry switches NOT off: {', '.join(status.telemetry_missing)}",
    ]
    last = status.last_blocked
    if last is not None:
        lines.append(
            f"Blocked since Bastion started: {status.blocked} — the last one, to "
            f"{last.target}, by {last.caller}"
        )
    else:
        lines.append("Blocked since Bastion started: none (nothing tried to connect)")
    return "\n".join(lines)


def audit_help_text(path: Path | None) -> str:
    where = str(path) if path is not None else "the audit log file (its place shows once read)"
    return (
        f"When on, each chat answer is appended to {where} as one line of JSON: the time, "
        "the model, the conversation, the system prompt, your question and the full "
        "answer. The file is readable by your user account only. When off, nothing is "
        "written there; turning it off keeps what was already recorded until you delete "
        "the file."
    )


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
    # The engine's change notification, carried to the GUI thread: (settings, names).
    settings_changed = Signal(object, object)

    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self.home = Path(engine.home)
        self.sizes: dict[str, int] | None = None
        self._sizes_op: ops.Operation | None = None
        self.config: Config | None = None  # the settings, once read
        self.audit_path: Path | None = None  # where the audit log goes, once read

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
        self.size_labels = {area: QLabel("…") for area in STORAGE_AREAS}
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
        self.audit_box.setEnabled(False)  # until the settings are read
        self.audit_box.toggled.connect(self._on_audit_box_toggled)
        audit_layout.addWidget(self.audit_box)
        self.audit_help = QLabel(audit_help_text(None))
        self.audit_help.setWordWrap(True)
        audit_layout.addWidget(self.audit_help)
        layout.addWidget(audit_box)

        # Appearance
        look_box = QGroupBox("Appearance")
        look = QFormLayout(look_box)
        self.theme_combo = QComboBox()
        for theme in THEMES:
            self.theme_combo.addItem(theme.capitalize(), theme)
        self.theme_combo.setCurrentIndex(THEMES.index("system"))
        self.theme_combo.setEnabled(False)  # until the settings are read
        self.theme_combo.currentIndexChanged.connect(self._on_theme_combo_changed)
        look.addRow("Colour scheme", self.theme_combo)
        self.scheme_label = QLabel()
        look.addRow("Now showing", self.scheme_label)
        layout.addWidget(look_box)
        layout.addStretch(1)

        QGuiApplication.styleHints().colorSchemeChanged.connect(self._show_scheme)
        self._show_scheme()
        self._config_reader = ops.Refresher(
            self._config_job, self._show_config, parent=self, name="settings-read"
        )
        self._guard_reader = ops.Refresher(
            self._privacy_job, self._show_privacy, parent=self, name="privacy-status"
        )
        # The listener runs on whichever thread saved or noticed the change; the signal
        # brings it to this page on the GUI thread (a queued connection).
        self.settings_changed.connect(self._on_settings_changed)
        stop_listening = engine.on_settings_changed(self.settings_changed.emit)
        self.destroyed.connect(lambda *_: stop_listening())
        self._config_reader.refresh()
        self.refresh_guard()

    def _config_job(self) -> Callable[[JobContext], Config]:
        engine = self.engine
        return lambda _: engine.get_settings()

    def _privacy_job(self) -> Callable[[JobContext], PrivacyStatus]:
        engine = self.engine
        return lambda _: engine.privacy_status()

    def _show_privacy(self, status: PrivacyStatus) -> None:
        self.guard_label.setText(guard_text(status))
        self.audit_path = status.audit_log_path
        self.audit_help.setText(audit_help_text(status.audit_log_path))

    def _on_settings_changed(self, config: Config, names: object) -> None:
        """A setting changed (here, on another page or in another process)."""
        if self.config is not None:  # switches not yet enabled wait for the first read
            self._show_config(config)

    def _show_config(self, config: Config) -> None:
        """The switches show the settings read (and the chosen theme is applied)."""
        self.config = config
        for widget in (self.audit_box, self.theme_combo):
            widget.blockSignals(True)
        self.audit_box.setChecked(config.audit_log)
        self.theme_combo.setCurrentIndex(THEMES.index(config.theme))
        for widget in (self.audit_box, self.theme_combo):
            widget.blockSignals(False)
            widget.setEnabled(True)
        if config.theme != "system":
            QGuiApplication.styleHints().setColorScheme(_THEME_SCHEMES[config.theme])
        self._show_scheme()

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
        engine = self.engine
        self._sizes_op = ops.run(
            engine.storage_usage,
            on_success=self._on_sizes,
            on_finished=self._on_sizes_finished,
            parent=self,
            name="folder-sizes",
            native=False,
        )

    def _on_sizes(self, usage: StorageUsage) -> None:
        self.sizes = usage.areas
        for area, size in usage.areas.items():
            self.size_labels[area].setText(human_size(size))
        self.size_labels["Total"].setText(human_size(usage.total))

    def _on_sizes_finished(self) -> None:
        self._sizes_op = None
        self.recount_button.setEnabled(True)

    @property
    def busy(self) -> bool:
        """Whether an operation of this page (a read, a write, the sizes) is running."""
        return bool(ops.running(self))

    def open_home(self) -> None:
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.home))):
            self.window_.notify(f"No file manager could be opened. The folder is {self.home}")

    # -- privacy -----------------------------------------------------------------------

    def refresh_guard(self) -> None:
        """Read the network guard's status again (off the GUI thread)."""
        self._guard_reader.refresh()

    def _write_setting(
        self,
        widget: QWidget,
        changes: dict[str, object],
        done: Callable[[Config], None],
        undo: Callable[[], None],
    ) -> None:
        """Save ``changes`` through the engine; ``widget`` is disabled meanwhile."""
        engine = self.engine
        widget.setEnabled(False)

        def refused(exc: BaseException) -> None:
            undo()
            self.window_.show_error(exc)

        ops.run(
            lambda _: engine.update_settings(**changes),
            on_success=done,
            on_failure=refused,
            on_finished=lambda: widget.setEnabled(True),
            parent=self,
            name="write-settings",
            native=False,
        )

    def _on_audit_box_toggled(self, checked: bool) -> None:
        def done(config: Config) -> None:
            self.config = config
            if checked:
                self.window_.notify(
                    "Audit log on: questions and answers are recorded in "
                    f"{self.audit_path or 'the audit log'}"
                )
            else:
                self.window_.notify("Audit log off: questions and answers are no longer recorded.")

        def undo() -> None:
            self.audit_box.blockSignals(True)
            self.audit_box.setChecked(not checked)
            self.audit_box.blockSignals(False)

        self._write_setting(self.audit_box, {"audit_log": checked}, done, undo)

    # -- appearance --------------------------------------------------------------------

    def _on_theme_combo_changed(self, index: int) -> None:
        theme = str(self.theme_combo.itemData(index))
        before = self.config.theme if self.config is not None else "system"

        def done(config: Config) -> None:
            self.config = config
            # Unknown hands the choice back to the system.
            QGuiApplication.styleHints().setColorScheme(_THEME_SCHEMES[theme])
            self._show_scheme()

        def undo() -> None:
            self.theme_combo.blockSignals(True)
            self.theme_combo.setCurrentIndex(THEMES.index(before))
            self.theme_combo.blockSignals(False)
            self._show_scheme()

        self._write_setting(self.theme_combo, {"theme": theme}, done, undo)

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
