"""The models page: installed models, import (dialog or drop), settings, hardware fit, and
models found and downloaded from the Hugging Face Hub (``desktop.hub``).

Following the GUI's threading rule (desktop/ops.py), every engine call runs through
``desktop.ops``: the table is filled by a ``Refresher`` when the registry's list comes
back (at construction, and after each import, save and removal); saving a model's
settings and removing a model are operations; importing (header check, optional copy)
and the selected model's hardware fit read model files. Probing the hardware waits
until the page is first shown: it asks llama.cpp whether it can offload to a GPU, which
imports it, and start-up must stay light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QShowEvent, QValidator
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from desktop.hub import HubPanel
from engine import BastionError, Hardware, JobContext, human_count, human_size

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Engine, ModelEntry, ModelInfo, WinRate

COLUMNS = (
    "Model",
    "Architecture",
    "Parameters",
    "Quantization",
    "Size",
    "Context",
    "Kind",
    "A/B win rate",
)
AUTO = -2  # the spin boxes' value for "decide automatically" (None in the registry)


class SettingSpin(QSpinBox):
    """A number box whose special values read as words ("auto", "all")."""

    def __init__(self, labels: dict[int, str], maximum: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.labels = labels
        self.setRange(min(labels), maximum)

    def textFromValue(self, value: int) -> str:
        return self.labels.get(value, str(value))

    def valueFromText(self, text: str) -> int:
        for value, label in self.labels.items():
            if text.strip().lower() == label:
                return value
        return super().valueFromText(text)

    def validate(self, text: str, pos: int) -> Any:
        typed = text.strip().lower()
        if typed and any(label.startswith(typed) for label in self.labels.values()):
            exact = typed in self.labels.values()
            return QValidator.State.Acceptable if exact else QValidator.State.Intermediate
        return super().validate(text, pos)

    def setting(self) -> int | None:
        """The registry's value: None for "auto"."""
        return None if self.value() == AUTO else self.value()

    def set_setting(self, value: int | None) -> None:
        self.setValue(AUTO if value is None else value)


def _win_rate(rate: WinRate | None) -> str:
    """A model's record in blind A/B votes (the Compare page), a tie counting half."""
    if rate is None:
        return "–"
    return f"{rate.rate:.0%} ({rate.low:.0%}–{rate.high:.0%}) of {rate.votes}"


class ModelsPage(QWidget):
    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self.hardware: Hardware | None = None
        self._fit_wanted: str | None = None  # a model whose fit waits for the page to show
        self._entries: dict[str, ModelEntry] = {}
        self.setAcceptDrops(True)

        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(QLabel("<h2>Models</h2>"))
        top.addStretch(1)
        self.copy_box = QCheckBox("Copy into Bastion's folder")
        self.copy_box.setToolTip(
            "Copy imported files into Bastion's models folder; otherwise they are used "
            "where they are and must stay there."
        )
        self.import_button = QPushButton("Import GGUF…")
        self.import_button.clicked.connect(self.open_import_dialog)
        self.remove_button = QPushButton("Remove…")
        self.remove_button.clicked.connect(self.remove_selected)
        for widget in (self.copy_box, self.import_button, self.remove_button):
            top.addWidget(widget)
        layout.addLayout(top)
        hint = QLabel(
            "Drop .gguf files on this page to import them. Bastion checks each file's "
            "header before it registers the model."
        )
        hint.setWordWrap(True)
        layout.addWidget(hint)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setAccessibleName("Installed models")
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._on_table_selection_changed)
        layout.addWidget(self.table, 1)

        bottom = QHBoxLayout()
        layout.addLayout(bottom)
        details_box = QGroupBox("Selected model")
        self.details = _selectable("No model selected.", Qt.TextFormat.RichText)
        self.fit = _selectable("")
        details_layout = QVBoxLayout(details_box)
        details_layout.addWidget(self.details)
        details_layout.addWidget(self.fit)
        details_layout.addStretch(1)
        bottom.addWidget(details_box, 2)

        settings_box = QGroupBox("How it loads")
        form = QFormLayout(settings_box)
        self.gpu_layers = SettingSpin({AUTO: "auto", -1: "all"}, 999)
        self.gpu_layers.setToolTip("Layers to run on the GPU: auto fits as many as free VRAM holds")
        self.context = SettingSpin({AUTO: "auto"}, 1 << 20)
        self.context.setSingleStep(512)
        self.context.setToolTip("Context window in tokens: auto is the model's own, up to 4096")
        self.threads = SettingSpin({AUTO: "auto"}, max(os.cpu_count() or 1, 1) * 2)
        self.threads.setToolTip("CPU threads: auto is one per physical core")
        form.addRow("GPU layers", self.gpu_layers)
        form.addRow("Context (tokens)", self.context)
        form.addRow("CPU threads", self.threads)
        self.save_button = QPushButton("Save")
        self.save_button.clicked.connect(self.save_settings)
        form.addRow(self.save_button)
        bottom.addWidget(settings_box, 1)

        hardware_box = QGroupBox("This machine")
        self.hardware_label = _selectable("Looking at the hardware…")
        QVBoxLayout(hardware_box).addWidget(self.hardware_label)
        bottom.addWidget(hardware_box, 1)

        self.hub = HubPanel(engine, self._on_pulled, self)
        layout.addWidget(self.hub, 1)

        self._table_reader = ops.Refresher(
            self._models_job, self._show_models, parent=self, name="models-list"
        )
        self.refresh()

    # -- state ----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether an engine call of this page (a read, an import, a probe) is running."""
        return bool(ops.running(self))

    def selected_id(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return item.text() if item is not None else None

    def select_model(self, model_id: str) -> None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.text() == model_id:
                self.table.selectRow(row)
                return

    def refresh(self, then: Callable[[], None] | None = None) -> None:
        """Reload the table from the registry, keeping the selection where it can.

        ``then`` runs once the table shows a read that began after this call.
        """
        self._table_reader.refresh(then)

    def _models_job(
        self,
    ) -> Callable[[JobContext], tuple[list[ModelEntry], dict[str, WinRate]]]:
        engine = self.engine
        return lambda _: (engine.list_models(), {r.model: r for r in engine.win_rates()})

    def _show_models(self, found: tuple[list[ModelEntry], dict[str, WinRate]]) -> None:
        entries, rates = found
        keep = self.selected_id()
        self._entries = {e.id: e for e in entries}
        self.table.blockSignals(True)  # one selection update below, not one per row
        self.table.setRowCount(0)
        for row, entry in enumerate(self._entries.values()):
            self.table.insertRow(row)
            cells = (
                entry.id,
                entry.arch,
                human_count(entry.params),
                entry.quant,
                human_size(entry.size_bytes),
                str(entry.context_length or "-"),
                _kind(entry),
                _win_rate(rates.get(entry.id)),
            )
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(entry.path if column == 0 else text)
                self.table.setItem(row, column, item)
        if keep in self._entries:
            self.select_model(keep)
        elif self._entries:
            self.table.selectRow(0)
        self.table.blockSignals(False)
        self._on_table_selection_changed()

    # -- the selected model -----------------------------------------------------------

    def _on_table_selection_changed(self) -> None:
        model_id = self.selected_id()
        entry = self._entries.get(model_id) if model_id else None
        self.remove_button.setEnabled(entry is not None and not entry.builtin)
        self.remove_button.setToolTip(
            "Built-in models come back at the next start" if entry and entry.builtin else ""
        )
        self.save_button.setEnabled(entry is not None)
        if entry is None:
            self.details.setText("No model selected.")
            self.fit.setText("")
            return
        lines = [
            f"File: {entry.path}",
            f"{entry.arch}, {human_count(entry.params)} parameters, {entry.quant}, "
            f"{human_size(entry.size_bytes)}",
            f"Trained context: {entry.context_length or 'not stated'} tokens",
            "Chat template: "
            + ("from the model file" if entry.chat_template else "none in the file; ChatML"),
        ]
        if entry.base:
            lines.append(f"Fine-tune of {entry.base}, adapter {entry.adapter}")
        self.details.setText(f"<b>{entry.id}</b><br>" + "<br>".join(map(_escape, lines)))
        # Up to the trained context (or what was set before, say from the command line).
        self.context.setMaximum(max(entry.context_length or 1 << 20, entry.settings.context or 1))
        for spin, value in (
            (self.gpu_layers, entry.settings.gpu_layers),
            (self.context, entry.settings.context),
            (self.threads, entry.settings.threads),
        ):
            spin.set_setting(value)
        self._fit_wanted = entry.id
        if self.isVisible():
            self._load_fit()
        else:
            self.fit.setText("")

    def _load_fit(self) -> None:
        model_id, self._fit_wanted = self._fit_wanted, None
        if model_id is None:
            return
        self.fit.setText("Checking whether it fits…")

        def shown(info: ModelInfo) -> None:
            if self.selected_id() == model_id:  # the user may have moved on
                self.fit.setText(fit_text(info))

        def failed(exc: BaseException) -> None:
            if self.selected_id() == model_id:
                self.fit.setText(f"Cannot tell whether it fits: {exc}")

        engine = self.engine
        ops.run(
            lambda _: engine.model_info(model_id),
            on_success=shown,
            on_failure=failed,
            parent=self,
            name="model-fit",
        )

    def save_settings(self) -> None:
        model_id = self.selected_id()
        if model_id is None:
            return
        engine = self.engine
        changes = {
            "gpu_layers": self.gpu_layers.setting(),
            "context": self.context.setting(),
            "threads": self.threads.setting(),
        }

        def saved(entry: ModelEntry) -> None:
            self.refresh()
            self.window_.notify(f"Saved how {entry.id} loads; it applies from its next answer.")

        ops.run(
            lambda _: engine.set_model_settings(model_id, **changes),
            on_success=saved,
            parent=self,
            name="save-model-settings",
            native=False,
        )

    # -- import and remove ------------------------------------------------------------

    def open_import_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self, "Import GGUF models", str(Path.home()), "GGUF models (*.gguf);;All files (*)"
        )
        if files:
            self.import_files([Path(f) for f in files])

    def import_files(self, paths: list[Path]) -> ops.Operation | None:
        """Validate and register ``paths`` off the GUI thread; report each refusal plainly."""
        if not paths:
            return None
        copy = self.copy_box.isChecked()
        engine = self.engine

        def work(ctx: JobContext) -> tuple[list[ModelEntry], list[str]]:
            imported, refused = [], []
            for n, path in enumerate(paths):
                ctx.check_cancelled()
                ctx.report(n, len(paths), path.name)
                try:
                    imported.append(engine.import_model(path, copy=copy))
                except BastionError as exc:  # a refusal the user should read, not a bug
                    refused.append(f"{path.name} was not imported: {exc}")
            return imported, refused

        self.import_button.setEnabled(False)
        self.window_.notify(f"Importing {', '.join(p.name for p in paths)}…")
        return ops.run(
            work,
            on_success=self._on_import_done,
            on_finished=lambda: self.import_button.setEnabled(True),
            parent=self,
            name="import-models",
        )

    def _on_import_done(self, result: tuple[list[ModelEntry], list[str]]) -> None:
        imported, refused = result
        done = [f"Imported {e.id} ({e.arch}, {e.quant})." for e in imported]
        self.window_.notify("\n".join(refused + done), "error" if refused else "success")
        if imported:
            self.refresh(then=lambda: self.select_model(imported[-1].id))

    def remove_selected(self) -> None:
        model_id = self.selected_id()
        entry = self._entries.get(model_id) if model_id else None
        if entry is None or entry.builtin:
            return
        answer = QMessageBox.question(
            self,
            "Remove model",
            f"Remove {entry.id} from Bastion?\n\nThe file {entry.path} is not deleted.",
        )
        if answer != QMessageBox.StandardButton.Yes:
            return
        engine = self.engine

        def removed(_: object) -> None:
            self.refresh()
            self.window_.notify(
                f"Removed {entry.id}; the file is still at {entry.path}.", "success"
            )

        ops.run(
            lambda _: engine.remove_model(entry.id),
            on_success=removed,
            parent=self,
            name="remove-model",
            native=False,
        )

    def _on_pulled(self, entry: ModelEntry) -> None:
        self.refresh(lambda: self.select_model(entry.id))

    # -- drag and drop -----------------------------------------------------------------

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if _local_files(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = _local_files(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.import_files(paths)

    # -- hardware ----------------------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self.hardware is None and not any(op.name == "hardware" for op in ops.running(self)):
            engine = self.engine
            ops.run(
                lambda _: engine.detect_hardware(),
                on_success=self._on_hardware,
                parent=self,
                name="hardware",
            )
        self._load_fit()

    def _on_hardware(self, hw: Hardware) -> None:
        self.hardware = hw
        self.hardware_label.setText(hardware_text(hw))


def _kind(entry: ModelEntry) -> str:
    if entry.base:
        return f"fine-tune: {entry.base} + {Path(entry.adapter or '').name}"
    return "built-in" if entry.builtin else "base model"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _selectable(text: str, fmt: Qt.TextFormat = Qt.TextFormat.PlainText) -> QLabel:
    """A wrapping label the user can copy from; plain text unless asked (file metadata and
    paths may hold '<')."""
    label = QLabel(text)
    label.setTextFormat(fmt)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def _local_files(mime: Any) -> list[Path]:
    if mime is None or not mime.hasUrls():
        return []
    return [Path(url.toLocalFile()) for url in mime.urls() if url.isLocalFile()]


def fit_text(info: ModelInfo) -> str:
    """Whether a model fits, in a sentence, from ``Engine.model_info``."""
    fit, hw = info.fit, info.hardware
    where = {
        "gpu": "the GPU",
        "split": f"the GPU ({fit.gpu_layers} layers) and the CPU",
        "cpu": "the CPU",
    }.get(fit.runs_on, fit.runs_on)
    verdict = "fits in" if fit.fits_in_ram else "does NOT fit in"
    return (
        f"With a {fit.context}-token context it needs about "
        f"{human_size(fit.estimated_bytes)}: it {verdict} the "
        f"{human_size(hw.ram_available_bytes)} of free memory, and runs on {where}."
    )


def hardware_text(hw: Hardware) -> str:
    lines = [
        f"CPU: {hw.cpu} — {hw.physical_cores} cores, {hw.logical_cores} threads",
        f"RAM: {human_size(hw.ram_total_bytes)}, {human_size(hw.ram_available_bytes)} free",
    ]
    if hw.gpus:
        lines += [
            f"GPU: {g.name} ({g.backend}) — VRAM {human_size(g.total_bytes)}, "
            f"{human_size(g.free_bytes)} free"
            for g in hw.gpus
        ]
    else:
        lines.append("GPU: none found")
    lines.append(
        "llama.cpp can offload layers to the GPU"
        if hw.gpu_offload_supported
        else "This llama.cpp build runs on the CPU only (GPU layers have no effect)"
    )
    return "\n".join(lines)
