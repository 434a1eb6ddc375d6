"""The Documents page: collections, adding files and folders, indexing, per-file state.

The page follows the GUI's threading rule (desktop/ops.py): it never calls the engine
itself. The list and the table are filled by a ``Refresher`` (one read at a time, the
newest answer shown); adding, re-indexing and removing are jobs of a ``CollectionJobs``
queue (desktop/documents/controller.py), which runs them one at a time -- files added
meanwhile, by dialog or by dropping them on the page, are indexed next. The page only
wires widgets to the queue's signals. Cancel stops the running job at the engine's next
check (what was committed stays) and empties the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from PySide6.QtCore import QModelIndex, Qt, QTimer, Signal
from PySide6.QtGui import QDragEnterEvent, QDragLeaveEvent, QDragMoveEvent, QDropEvent, QShowEvent
from PySide6.QtWidgets import (
    QFileDialog,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from desktop.documents.controller import CollectionJob, CollectionJobs
from desktop.documents.files import PATH_ROLE
from desktop.documents.panel import CollectionPanel, summary_text
from desktop.documents.progress import report_text

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Collection, Document, Engine, IndexReport, JobContext, Progress


REFRESH_WHILE_INDEXING_MS = 1000
FILE_FILTER = (
    "Documents (*.pdf *.docx *.md *.markdown *.txt *.rst *.html *.htm *.csv *.json *.py);;"
    "All files (*)"
)
Status = tuple["Collection", dict[str, int], list["Document"]]
# (the collection asked for, every collection with its summary, the status of the one shown)
Snapshot = tuple[str | None, list[tuple["Collection", dict[str, int]]], Status | None]


class DocumentsPage(QWidget):
    files_loaded = Signal()  # the list and the table show what the database held just now
    indexing_finished = Signal(object)  # the IndexReport, or None when it ended otherwise

    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        self._selected: str | None = None
        self.jobs = CollectionJobs(engine, self)
        self.jobs.started.connect(self._on_jobs_started)
        self.jobs.progressed.connect(self._on_jobs_progressed)
        self.jobs.succeeded.connect(self._on_jobs_succeeded)
        self.jobs.failed.connect(self._on_jobs_failed)
        self.jobs.cancelled.connect(self._on_jobs_cancelled)
        self.jobs.finished.connect(self._on_jobs_finished)
        self._reader = ops.Refresher(
            self._read_job, self._on_read, parent=self, name="documents-read"
        )
        self.setAcceptDrops(True)
        self._build()
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setInterval(REFRESH_WHILE_INDEXING_MS)
        self._refresh_timer.timeout.connect(self.refresh)
        self._update_actions()

    # -- layout -----------------------------------------------------------------------

    def _build(self) -> None:
        splitter = QSplitter()
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(QLabel("<b>Collections</b>"))
        self.collection_list = QListWidget()
        self.collection_list.setAccessibleName("Collections")
        self.collection_list.currentItemChanged.connect(self._on_collection_list_changed)
        left_layout.addWidget(self.collection_list, 1)
        self.new_button = QPushButton("New collection…")
        self.new_button.clicked.connect(self.new_collection)
        left_layout.addWidget(self.new_button)
        splitter.addWidget(left)

        self.detail_stack = QStackedWidget()
        empty = QWidget()
        empty_layout = QVBoxLayout(empty)
        self.empty_label = QLabel(
            "No collections yet.\n\nA collection is a set of your files (PDF, Word, Markdown, "
            "text, code) that Bastion indexes on this machine, so that you can ask questions "
            "about them in Chat. Create one, then add files or folders — or drop them here."
        )
        self.empty_label.setWordWrap(True)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        empty_layout.addStretch(1)
        empty_layout.addWidget(self.empty_label)
        empty_layout.addStretch(2)
        self.detail_stack.addWidget(empty)
        self.panel = CollectionPanel()
        self.panel.add_files_button.clicked.connect(self.choose_files)
        self.panel.add_folder_button.clicked.connect(self.choose_folder)
        self.panel.sync_button.clicked.connect(self.sync)
        self.panel.remove_button.clicked.connect(self.ask_remove)
        self.panel.progress.cancel_requested.connect(self.cancel_indexing)
        self.panel.table.doubleClicked.connect(self._on_table_double_clicked)
        self.detail_stack.addWidget(self.panel)
        splitter.addWidget(self.detail_stack)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([220, 900])

    # -- state ------------------------------------------------------------------------

    @property
    def selected(self) -> str | None:
        """The name of the collection shown on the right."""
        return self._selected

    @property
    def indexing(self) -> bool:
        """Whether a job that indexes files (add, sync) is running."""
        job = self.jobs.current
        return job is not None and job.indexes

    @property
    def busy(self) -> bool:
        """Whether any engine call of this page is still running (tests wait for this)."""
        return bool(ops.running(self))

    def _update_actions(self) -> None:
        has = self._selected is not None
        job = self.jobs.current
        working_on_this = job is not None and job.collection == self._selected
        self.panel.add_files_button.setEnabled(has)
        self.panel.add_folder_button.setEnabled(has)
        self.panel.sync_button.setEnabled(has and not self.indexing)
        self.panel.remove_button.setEnabled(has and not working_on_this)
        self.detail_stack.setCurrentIndex(1 if has else 0)

    def select_collection(self, name: str | None) -> None:
        """Show collection ``name`` (its files are read in the background)."""
        if name == self._selected:
            return
        self._selected = name
        self.panel.clear(name)
        self._update_actions()
        self.refresh()

    def _on_collection_list_changed(self, item: QListWidgetItem | None, _: object) -> None:
        if item is not None:
            self.select_collection(item.text())

    # -- reading ----------------------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:
        """Read again each time the page is shown: the command line may have changed things."""
        super().showEvent(event)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the collections and the shown collection's files, off the GUI thread."""
        self._reader.refresh()

    def _read_job(self) -> Callable[[JobContext], Snapshot]:
        engine, wanted = self.engine, self._selected

        def read(_: JobContext) -> Snapshot:
            docs = engine.documents
            items = docs.all()
            names = [c.name for c, _ in items]
            target = wanted if wanted in names else (names[0] if names else None)
            return wanted, items, docs.status(target) if target is not None else None

        return read

    def _on_read(self, snapshot: Snapshot) -> None:
        wanted, items, status = snapshot
        names = [c.name for c, _ in items]
        self.collection_list.blockSignals(True)
        shown = [self.collection_list.item(i).text() for i in range(self.collection_list.count())]
        if shown != names:  # rebuilt only when it changed: a refresh keeps scroll and focus
            self.collection_list.clear()
            for name in names:
                QListWidgetItem(name, self.collection_list)
        for row, (collection, summary) in enumerate(items):
            self.collection_list.item(row).setToolTip(summary_text(collection, summary))
        if self._selected in names:
            self.collection_list.setCurrentRow(names.index(self._selected))
        self.collection_list.blockSignals(False)
        if self._selected != wanted:
            return  # another collection was picked meanwhile: its read follows this one
        if status is None:
            self._selected = None
        else:
            collection, summary, documents = status
            self._selected = collection.name
            self.panel.show_collection(collection, summary, documents)
            self.collection_list.blockSignals(True)
            self.collection_list.setCurrentRow(names.index(collection.name))
            self.collection_list.blockSignals(False)
        self._update_actions()
        self.files_loaded.emit()

    def _on_table_double_clicked(self, index: QModelIndex) -> None:
        from desktop.viewer import show_source
        from engine import Citation

        path = index.data(PATH_ROLE)
        if path:
            page = 1 if str(path).lower().endswith(".pdf") else None
            show_source(self, Citation(0, str(path), page), self.engine)

    # -- collections ------------------------------------------------------------------

    def new_collection(self) -> None:
        """Ask for a name (a non-blocking dialog) and create the collection."""
        dialog = QInputDialog(self)
        dialog.setWindowTitle("New collection")
        dialog.setLabelText("Name (letters, digits, spaces, '.', '+', '_' or '-'):")
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.textValueSelected.connect(self.create_collection)
        dialog.open()

    def create_collection(self, name: str) -> None:
        name = name.strip()
        if not name:
            return
        engine = self.engine

        def created(collection: Collection) -> None:
            self.window_.notify(
                f"Collection {collection.name} created. Add files or folders, or drop them here.",
                "success",
            )
            self._selected = None
            self.select_collection(collection.name)

        ops.run(
            lambda _: engine.documents.create(name),
            on_success=created,
            parent=self,
            name="create-collection",
        )

    def ask_remove(self) -> None:
        """Confirm (non-blocking), then remove the shown collection."""
        name = self._selected
        if name is None:
            return
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Remove collection",
            f"Remove the collection {name} and its index?\n\nYour files are not touched.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            self,
        )
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.button(QMessageBox.StandardButton.Yes).setText("Remove")

        def answered(button: int) -> None:
            if button == QMessageBox.StandardButton.Yes:
                self.remove_collection(name)

        box.finished.connect(answered)
        box.open()

    def remove_collection(self, name: str) -> None:
        """Remove collection ``name`` (after the running job, if one runs)."""
        job = self.jobs.current
        if job is not None and job.collection == name:
            self.window_.notify(f"{name} is being indexed: cancel that first.", "error")
            return
        if self.jobs.busy:
            self.window_.notify(f"{name} will be removed when the current job ends.")
        self.jobs.remove(name)

    # -- adding and indexing ------------------------------------------------------------

    def choose_files(self) -> None:
        dialog = QFileDialog(self, "Add files", "", FILE_FILTER)
        dialog.setFileMode(QFileDialog.FileMode.ExistingFiles)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.filesSelected.connect(self.add_paths)
        dialog.open()

    def choose_folder(self) -> None:
        dialog = QFileDialog(self, "Add a folder (with its subfolders)")
        dialog.setFileMode(QFileDialog.FileMode.Directory)
        dialog.setOption(QFileDialog.Option.ShowDirsOnly, True)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(lambda path: self.add_paths([path]))
        dialog.open()

    def add_paths(self, paths: Sequence[str], name: str | None = None) -> None:
        """Add files or folders to collection ``name`` (default: the shown one) and index."""
        name = name or self._selected
        paths = [p for p in paths if p]
        if not paths:
            return
        if name is None:
            self.window_.notify("Create or pick a collection first, then add the files.", "error")
            return
        if self.jobs.busy:
            self.window_.notify(f"{len(paths)} item(s) will be added to {name} next.")
        self.jobs.add(name, paths)

    def sync(self) -> None:
        """Re-index what changed in the shown collection and drop what was deleted."""
        name = self._selected
        if name is None or self.indexing:
            return
        self.jobs.sync(name)

    def cancel_indexing(self) -> None:
        """Stop the running job at the engine's next check, and forget queued ones."""
        self.jobs.cancel()

    # -- the queue's signals --------------------------------------------------------------

    def _on_jobs_started(self, job: CollectionJob) -> None:
        if job.indexes:
            self.panel.progress.start(job.title)
            self._refresh_timer.start()
        self._update_actions()
        self.refresh()  # shows the sources' files as they are marked waiting

    def _on_jobs_progressed(self, progress: Progress) -> None:
        self.panel.progress.update_progress(progress)

    def _on_jobs_succeeded(self, job: CollectionJob, result: object) -> None:
        name = job.collection
        if job.kind == "remove":
            self.window_.notify(f"Collection {name} removed. Your files were not touched.")
            if self._selected == name:
                self._selected = None
            return
        report = cast("IndexReport", result)
        kind = "info" if report.failed or report.cancelled else "success"
        self.window_.notify(report_text(name, report), kind)

    def _on_jobs_failed(self, _job: CollectionJob, exc: BaseException) -> None:
        self.window_.show_error(exc)

    def _on_jobs_cancelled(self, job: CollectionJob) -> None:
        if job.indexes:
            self.window_.notify(f"Indexing of {job.collection} cancelled.")

    def _on_jobs_finished(self, job: CollectionJob, result: object) -> None:
        self._refresh_timer.stop()
        self.panel.progress.stop()
        self._update_actions()
        self.refresh()
        if job.indexes:
            self.indexing_finished.emit(result)

    # -- drag and drop ------------------------------------------------------------------

    @staticmethod
    def _local_paths(event: QDropEvent | QDragEnterEvent | QDragMoveEvent) -> list[str]:
        mime = event.mimeData()
        if not mime.hasUrls():
            return []
        return [url.toLocalFile() for url in mime.urls() if url.isLocalFile()]

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self._local_paths(event):
            event.acceptProposedAction()
            self.panel.show_drop_target(self._selected or "a collection (create one first)")
        else:
            event.ignore()

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        if self._local_paths(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:
        self.panel.show_drop_target(None)
        super().dragLeaveEvent(event)

    def dropEvent(self, event: QDropEvent) -> None:
        self.panel.show_drop_target(None)
        paths = self._local_paths(event)
        if not paths:
            event.ignore()
            return
        event.acceptProposedAction()
        self.add_paths(paths)
