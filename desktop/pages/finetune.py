"""The Fine-tune page: choose a base and a dataset, preview it, train, watch, and chat with it.

Everything slow goes through ``desktop.ops``: the dataset preview and the whole
``engine.training.finetune`` call (data preparation, the trainer child process, export,
evaluation). Progress arrives throttled; each publish carries the trainer's latest JSON
event in ``detail``, which feeds the chart and the log. Cancel sets the job's flag: the
engine asks the trainer to save a checkpoint and stop, and ends the call with
``Cancelled``; the run is then listed as stopped and Resume continues it.

Following the GUI's threading rule (desktop/ops.py), the lists are read off the GUI
thread too: one ``Refresher`` reads the base models, the names taken and the past runs
together; another reads a run's record and its ``metrics.jsonl`` for the chart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from desktop.finetune.monitor import TrainingMonitor
from desktop.finetune.preview import PreviewView
from desktop.finetune.results import ResultView
from desktop.finetune.runs import RESUMABLE, RunsTable
from desktop.finetune.settings import TrainingSettings
from engine import (
    BastionError,
    DatasetPreview,
    FeedbackDataset,
    FinetuneRequest,
    FinetuneResult,
    JobContext,
    LossCurve,
    Progress,
    RunRecord,
)

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Engine

# (the base models' ids, the default model's id, every name taken, the past runs, the
# fine-tunes that a run can continue from)
Catalog = tuple[list[str], str | None, set[str], list[RunRecord], list[str]]
NEW_ADAPTER = "(a new adapter on the base model)"
# (a run's record, or None when there is no such run; its training and validation losses)
RunPoints = tuple[RunRecord | None, LossCurve]


class FinetunePage(QWidget):
    """Base model + dataset + settings on the left; progress, chart, log and report right."""

    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self.training_op: ops.Operation | None = None
        self.preview_op: ops.Operation | None = None
        self._preview_failed = False
        self._name_edited = False
        self._run_name: str | None = None
        self._taken: set[str] = set()  # model ids and run names: a new model needs another
        self._select_run: str | None = None  # the run to select when the runs are read
        self._chart_run: str | None = None  # the run whose losses the chart should show
        self._catalog = ops.Refresher(
            self._catalog_job, self._show_catalog, parent=self, name="finetune-catalog"
        )
        self._chart_reader = ops.Refresher(
            lambda: self._run_job(self._chart_run or ""),
            self._show_points,
            parent=self,
            name="finetune-chart",
        )
        self._build()
        self.refresh()
        self._update_buttons()

    # -- layout --------------------------------------------------------------------------

    def _build(self) -> None:
        self.setup = QWidget()
        setup_layout = QVBoxLayout(self.setup)
        data_box = QGroupBox("Model and data")
        form = QFormLayout(data_box)
        self.base = QComboBox()
        self.base.setAccessibleName("Base model")
        form.addRow("Base model", self.base)
        self.continue_from = QComboBox()
        self.continue_from.setAccessibleName("Continue from")
        self.continue_from.setToolTip(
            "Train further from an earlier fine-tune (its base, LoRA shape and weights)"
        )
        self.continue_from.addItem(NEW_ADAPTER)
        form.addRow("Continue from", self.continue_from)
        self.dataset = QLineEdit()
        self.dataset.setReadOnly(True)
        self.dataset.setPlaceholderText("a JSONL file: chat, sharegpt, alpaca or text")
        self.choose = QPushButton("Choose…")
        self.feedback_button = QPushButton("Use feedback")
        self.feedback_button.setToolTip(
            "Make a dataset of the answers you rated good or corrected and your A/B picks"
        )
        self.preview_button = QPushButton("Preview")
        self.preview_button.setToolTip("Check the file again (after editing it)")
        row = QHBoxLayout()
        row.addWidget(self.choose)
        row.addWidget(self.feedback_button)
        row.addWidget(self.preview_button)
        row.addStretch(1)
        form.addRow("Dataset", self.dataset)
        form.addRow("", row)
        self.name = QLineEdit()
        self.name.setAccessibleName("New model name")
        self.name.setPlaceholderText("the new model's id")
        form.addRow("New model", self.name)
        setup_layout.addWidget(data_box)
        preview_box = QGroupBox("Dataset preview")
        QVBoxLayout(preview_box).addWidget(preview := PreviewView())
        self.preview = preview
        setup_layout.addWidget(preview_box)
        settings_box = QGroupBox("Training settings")
        QVBoxLayout(settings_box).addWidget(settings := TrainingSettings())
        self.settings = settings
        setup_layout.addWidget(settings_box)
        setup_layout.addStretch(1)

        self.start_button = QPushButton("Start training")
        self.start_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Save a checkpoint and stop; Resume continues later")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the stopped or failed run selected below")
        self.start_hint = QLabel()
        self.start_hint.setWordWrap(True)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.cancel_button, self.resume_button):
            buttons.addWidget(button)
        self.runs = RunsTable()

        left = QWidget()
        left_layout = QVBoxLayout(left)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.setup)
        left_layout.addWidget(scroll, 1)
        left_layout.addLayout(buttons)
        left_layout.addWidget(self.start_hint)
        left_layout.addWidget(QLabel("Past runs (select a stopped one to resume it)"))
        left_layout.addWidget(self.runs)

        self.monitor = TrainingMonitor()
        self.chart = self.monitor.chart
        self.results = ResultView()
        self.tabs = QTabWidget()
        self.tabs.addTab(self.monitor, "Progress")
        self.tabs.addTab(self.results, "Report")

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(self.tabs)
        splitter.setSizes([460, 560])
        QVBoxLayout(self).addWidget(splitter)

        self.choose.clicked.connect(self._on_choose_clicked)
        self.feedback_button.clicked.connect(self.use_feedback)
        self.continue_from.currentIndexChanged.connect(self._on_continue_from_changed)
        self.preview_button.clicked.connect(self.run_preview)
        self.base.currentIndexChanged.connect(self._on_base_current_index_changed)
        self.name.textEdited.connect(self._on_name_text_edited)
        self.name.textChanged.connect(self._update_buttons)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button.clicked.connect(self.resume)
        self.runs.itemSelectionChanged.connect(self._on_runs_item_selection_changed)
        self.results.chat_requested.connect(self.window_.open_chat_with)
        self.results.compare_requested.connect(self.window_.open_compare_with)

    def showEvent(self, event: QShowEvent) -> None:
        # Models may have been imported or removed on the Models page meanwhile.
        super().showEvent(event)
        if self.training_op is None:
            self.refresh()

    # -- models, names, runs -------------------------------------------------------------

    @property
    def loading(self) -> bool:
        """Whether a read of this page (lists, a run's losses) is still running."""
        return any(op not in (self.training_op, self.preview_op) for op in ops.running(self))

    def refresh(self, select_run: str | None = None) -> None:
        """Read the base models and the past runs again (selecting ``select_run``)."""
        if select_run is not None:
            self._select_run = select_run
        self._catalog.refresh()

    def _catalog_job(self) -> Callable[[JobContext], Catalog]:
        engine = self.engine

        def read(_: JobContext) -> Catalog:
            models = engine.list_models()
            runs = engine.training.list_runs()
            default = engine.default_model_id() if models else None
            taken = {m.id for m in models} | {r.name for r in runs}
            trained = {r.name for r in runs if r.status == "done"}
            tuned = [m.id for m in models if m.adapter and m.id in trained]
            return [m.id for m in models if not m.adapter], default, taken, runs, tuned

        return read

    def _show_catalog(self, catalog: Catalog) -> None:
        """Base models: every registered model that is not a fine-tune itself.

        Architectures the trainer cannot handle are listed too: starting one shows the
        engine's refusal, which says what is supported, rather than hiding the model.
        """
        ids, default_id, self._taken, runs, tuned = catalog
        chosen = self.continue_from.currentText()
        self.continue_from.blockSignals(True)
        self.continue_from.clear()
        self.continue_from.addItems([NEW_ADAPTER, *tuned])
        if chosen in tuned:
            self.continue_from.setCurrentText(chosen)
        self.continue_from.blockSignals(False)
        self._on_continue_from_changed()
        current = self.base.currentText()
        self.base.blockSignals(True)
        self.base.clear()
        self.base.addItems(ids)
        default = current if current in ids else default_id
        if default in ids:
            self.base.setCurrentText(default)
        self.base.blockSignals(False)
        if self.base.currentText() != current:
            self._on_base_current_index_changed()
        select, self._select_run = self._select_run, None
        self.runs.set_runs(runs, select)
        self._update_buttons()

    def _suggested_name(self) -> str:
        base = self.base.currentText()
        stem = f"{base[:58]}-ft"
        name, n = stem, 2
        while name in self._taken:
            name, n = f"{stem}-{n}", n + 1
        return name

    # -- dataset preview -----------------------------------------------------------------

    def set_dataset(self, path: Path | str) -> None:
        """Use ``path`` as the training file and preview it."""
        self.dataset.setText(str(path))
        self.run_preview()

    def run_preview(self) -> None:
        text = self.dataset.text()
        if not text:
            return
        if self.preview_op is not None:
            self.preview_op.cancel()  # its result is ignored: it is no longer current
        path = Path(text)
        base = self.base.currentText() or None
        max_tokens = self.settings.hyper().max_length if self._hyper_valid() else 1024
        val_fraction = self.settings.val_fraction.value()
        self._preview_failed = False
        self.preview.show_running(path)
        training = self.engine.training

        def work(ctx: JobContext) -> DatasetPreview:
            return training.preview_dataset(path, base, max_tokens, val_fraction, ctx)

        op: ops.Operation

        def succeeded(result: DatasetPreview) -> None:
            if self.preview_op is op:
                self.preview.show_result(result)

        def failed(exc: BaseException) -> None:
            if self.preview_op is op:
                self._preview_failed = True
                self.preview.show_failed(str(exc))
                self.window_.show_error(exc)

        def finished() -> None:
            if self.preview_op is op:
                self.preview_op = None
                self._update_buttons()

        op = ops.run(
            work,
            on_success=succeeded,
            on_failure=failed,
            on_finished=finished,
            parent=self,
            name="dataset-preview",
        )
        self.preview_op = op
        self._update_buttons()

    def _hyper_valid(self) -> bool:
        try:
            self.settings.hyper()
        except BastionError:
            return False
        return True

    def from_model(self) -> str | None:
        """The fine-tune a new run continues from, or None for a new adapter."""
        chosen = self.continue_from.currentText()
        return chosen if chosen and chosen != NEW_ADAPTER else None

    def _on_continue_from_changed(self) -> None:
        self.base.setEnabled(self.from_model() is None)  # --from brings its own base

    def use_feedback(self) -> None:
        """Write the feedback given so far as a dataset in the home, then preview it."""
        out = self.engine.home / "feedback" / f"feedback-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        engine = self.engine
        ops.run(
            lambda _ctx: engine.feedback_dataset(out),
            on_success=self._show_feedback,
            parent=self,
            name="feedback-dataset",
            native=False,
        )

    def _show_feedback(self, made: FeedbackDataset) -> None:
        if not made.examples:
            self.window_.notify(
                "No usable feedback yet: rate or correct answers in Chat, or vote on the "
                "Compare page."
            )
            return
        noun = "example" if made.examples == 1 else "examples"
        self.window_.notify(
            f"{made.examples} {noun} from feedback ({made.from_ratings} rated good, "
            f"{made.from_corrections} corrected, {made.from_ab} A/B picks): review the "
            "preview before training."
        )
        self.set_dataset(made.out)

    # -- training ------------------------------------------------------------------------

    def start(self) -> None:
        """Start a new run with the form's base, dataset, name and settings."""
        try:
            hyper = self.settings.hyper()
        except BastionError as exc:
            self.window_.show_error(exc)
            return
        from_model = self.from_model()
        request = FinetuneRequest(
            name=self.name.text().strip(),
            base=None if from_model else self.base.currentText(),
            from_model=from_model,
            data=Path(self.dataset.text()),
            hyper=hyper,
            backend=self.settings.backend.currentText(),
            redact=self.settings.redact.isChecked(),
            val_fraction=self.settings.val_fraction.value(),
        )
        self.chart.clear()
        self.results.clear()
        self._begin(request, f"Starting {request.name}…")

    def resume(self) -> None:
        """Continue the selected stopped or failed run from its last checkpoint."""
        run = self.runs.selected_run()
        if run is None or run.status not in RESUMABLE:
            return
        self._sync_chart(run.name)
        self._begin(FinetuneRequest(name=run.name, resume=True), f"Resuming {run.name}…")

    def cancel(self) -> None:
        if self.training_op is not None:
            self.training_op.cancel()
            self.monitor.status.setText("Stopping: the trainer saves a checkpoint first…")
            self.cancel_button.setEnabled(False)

    def _begin(self, request: FinetuneRequest, status: str) -> None:
        self._run_name = request.name
        self.monitor.begin(status)
        self.tabs.setCurrentWidget(self.monitor)
        training = self.engine.training

        def work(ctx: JobContext) -> FinetuneResult:
            return training.finetune(request, ctx)

        self.training_op = ops.run(
            work,
            on_success=self._on_training_succeeded,
            on_failure=self._on_training_failed,
            on_progress=self._on_training_progressed,
            on_cancel=self._on_training_cancelled,
            on_finished=self._on_training_finished,
            parent=self,
            name="finetune",
        )
        self._update_buttons()

    def _sync_chart(self, name: str | None) -> None:
        """Redraw the chart from run ``name``'s ``metrics.jsonl``, the record of every step.

        Progress publishes are throttled and carry only the latest event, so the chart fed
        live can miss a step (often the last: a status event follows it at once); the file
        has them all, and the validation losses that no progress event carries.
        """
        if name is None:
            return
        self._chart_run = name
        self._chart_reader.refresh()

    def _run_job(self, name: str) -> Callable[[JobContext], RunPoints]:
        """A job that reads run ``name``'s record and its losses."""
        engine = self.engine

        def read(_: JobContext) -> RunPoints:
            run = engine.training.get_run(name)
            if run is None:
                return None, LossCurve([], [])
            return run, engine.training.loss_curve(name)

        return read

    def _show_points(self, found: RunPoints) -> None:
        run, curve = found
        if run is not None and (curve.train or curve.validation):
            self.chart.set_points(curve.train, curve.validation)
            self.chart.set_total(run.total_steps)

    def _on_training_progressed(self, p: Progress) -> None:
        op = self.training_op
        stopping = op is None or op.ctx.cancelled
        self.monitor.show_progress(p, None if stopping else f"Training {self._run_name}: {p.label}")

    def _on_training_succeeded(self, result: FinetuneResult) -> None:
        self._sync_chart(result.model)
        self.monitor.end(f"Done: {result.model} is ready to chat with.", succeeded=True)
        self.results.show_result(result)
        self.tabs.setCurrentWidget(self.results)
        self.window_.notify(f"Fine-tune {result.model} is ready.", "success")
        self.refresh(select_run=result.model)

    def _on_training_cancelled(self) -> None:
        name = self._run_name or ""
        ops.run(
            self._run_job(name),
            on_success=lambda found: self._show_stopped(name, found),
            parent=self,
            name="finetune-stopped-run",
            native=False,
        )

    def _show_stopped(self, name: str, found: RunPoints) -> None:
        self._show_points(found)
        run = found[0]
        if run is None:  # stopped while the data was being checked: nothing to resume
            text = "Stopped before training began."
        else:
            of = f" of {run.total_steps}" if run.total_steps else ""
            text = f"Stopped at step {run.step}{of} — Resume continues from the last checkpoint."
        self.monitor.end(text)
        self.window_.notify(f"{name}: {text}")
        self.refresh(select_run=name)

    def _on_training_failed(self, exc: BaseException) -> None:
        if self._run_name is not None and self.chart.points:  # it had begun training
            self._sync_chart(self._run_name)
        self.monitor.end(f"Failed: {exc}")
        self.window_.show_error(exc)
        self.refresh(select_run=self._run_name)

    def _on_training_finished(self) -> None:
        self.training_op = None
        self._update_buttons()

    # -- state ---------------------------------------------------------------------------

    def _update_buttons(self) -> None:
        training = self.training_op is not None
        previewing = self.preview_op is not None
        reason = ""
        if not self.base.currentText():
            reason = "Import a base model on the Models page first."
        elif not self.dataset.text():
            reason = "Choose a dataset."
        elif previewing:
            reason = "Checking the dataset…"
        elif self.preview.bad_line_count:
            reason = f"The dataset has {self.preview.bad_line_count} bad line(s): fix them first."
        elif self.preview.result is not None and not self.preview.usable:
            reason = "The dataset has no examples."
        elif not self.name.text().strip():
            reason = "Name the new model."
        self.start_button.setEnabled(not training and not reason)
        self.start_button.setToolTip(reason)
        self.start_hint.setText("" if training else reason)
        self.cancel_button.setEnabled(
            self.training_op is not None and not self.training_op.ctx.cancelled
        )
        run = self.runs.selected_run()
        self.resume_button.setEnabled(not training and run is not None and run.status in RESUMABLE)
        self.setup.setEnabled(not training)
        self.runs.setEnabled(not training)

    def _on_choose_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Training data", self.dataset.text(), "JSON Lines (*.jsonl *.json);;All (*)"
        )
        if path:
            self.set_dataset(path)

    def _on_base_current_index_changed(self) -> None:
        if not self._name_edited:
            self.name.setText(self._suggested_name())
        if self.dataset.text():
            self.run_preview()  # token counts depend on the base's tokenizer
        self._update_buttons()

    def _on_name_text_edited(self, text: str) -> None:
        self._name_edited = bool(text)

    def _on_runs_item_selection_changed(self) -> None:
        run = self.runs.selected_run()
        if run is not None and self.training_op is None:
            self._sync_chart(run.name)
            if run.status == "done" and run.result:
                self.results.show_result(run.result)
        self._update_buttons()
