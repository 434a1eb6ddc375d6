"""Find and download models from the Hugging Face Hub, on the Models page.

A search lists GGUF repositories with each file's quantization, size and whether it would
fit this machine; Download pulls the selected file (``Engine.pull_model``: resumable,
SHA-256 checked) with progress, rate and time left, and a Cancel that keeps the partial
file for the next try. Both run off the GUI thread (desktop/ops.py); they are the only
things in the app that connect out, and only to the hub, only while they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from desktop.documents.progress import format_duration
from engine import human_size

if TYPE_CHECKING:
    from engine import Engine, HubFile, HubRepo, ModelEntry, Progress

FIT_WORDS = {"gpu": "fits the GPU", "ram": "fits in memory", "no": "too big here", None: "?"}
_FILE_ROLE = Qt.ItemDataRole.UserRole


class HubPanel(QGroupBox):
    """Search the hub, pick a file, download it; ``on_pulled`` gets the new model."""

    def __init__(
        self, engine: Engine, on_pulled: Callable[[ModelEntry], None], parent: QWidget | None = None
    ) -> None:
        super().__init__("Find models on the Hugging Face Hub", parent)
        self.engine = engine
        self.on_pulled = on_pulled
        self.download: ops.Operation | None = None
        layout = QVBoxLayout(self)

        row = QHBoxLayout()
        self.query = QLineEdit()
        self.query.setPlaceholderText("e.g. qwen 0.5b instruct")
        self.query.setAccessibleName("Search the hub")
        self.query.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        row.addWidget(self.query, 1)
        row.addWidget(self.search_button)
        layout.addLayout(row)

        self.results = QTreeWidget()
        self.results.setColumnCount(4)
        self.results.setHeaderLabels(["Repository / file", "Quantization", "Size", "Fit"])
        self.results.setAccessibleName("Hub search results")
        self.results.itemSelectionChanged.connect(self._selection_changed)
        self.results.itemDoubleClicked.connect(lambda *_: self.start_download())
        layout.addWidget(self.results, 1)

        bottom = QHBoxLayout()
        self.status = QLabel("Searching connects to the hub, and only to it.")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.download_button = QPushButton("Download")
        self.download_button.setEnabled(False)
        self.download_button.clicked.connect(self.start_download)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setVisible(False)
        self.cancel_button.clicked.connect(self.cancel_download)
        bottom.addWidget(self.status, 1)
        bottom.addWidget(self.progress, 1)
        bottom.addWidget(self.download_button)
        bottom.addWidget(self.cancel_button)
        layout.addLayout(bottom)

    # -- search ---------------------------------------------------------------------------

    def search(self) -> None:
        text = self.query.text().strip()
        if not text:
            self.status.setText("Type what to look for, e.g. a model family and size.")
            return
        self.search_button.setEnabled(False)
        self.status.setText(f"Searching the hub for “{text}”…")
        engine = self.engine

        def failed(exc: BaseException) -> None:
            self.status.setText(f"Search failed: {getattr(exc, 'message', exc)}")

        ops.run(
            lambda _: engine.search_hub(text),
            on_success=self._show,
            on_failure=failed,
            on_finished=lambda: self.search_button.setEnabled(True),
            parent=self,
            name="hub-search",
            native=False,
        )

    def _show(self, repos: list[HubRepo]) -> None:
        self.results.clear()
        for repo in repos:
            downloads = "" if repo.downloads is None else f" · {repo.downloads:,} downloads"
            top = QTreeWidgetItem(
                [f"{repo.repo}  (licence {repo.license or 'not stated'}{downloads})"]
            )
            for f in repo.files:
                child = QTreeWidgetItem(
                    [f.name, f.quant or "-", human_size(f.size), FIT_WORDS.get(f.fits, "?")]
                )
                child.setData(0, _FILE_ROLE, (repo.repo, f))
                top.addChild(child)
            self.results.addTopLevelItem(top)
            top.setExpanded(True)
        self.results.resizeColumnToContents(0)
        files = sum(len(r.files) for r in repos)
        self.status.setText(
            f"{len(repos)} repositories, {files} GGUF files. Select a file and press Download."
            if repos
            else "Nothing on the hub matches; try fewer words."
        )

    def _selected(self) -> tuple[str, HubFile] | None:
        items = self.results.selectedItems()
        chosen = items[0].data(0, _FILE_ROLE) if items else None
        return chosen if isinstance(chosen, tuple) else None

    def _selection_changed(self) -> None:
        self.download_button.setEnabled(self._selected() is not None and self.download is None)

    # -- download -------------------------------------------------------------------------

    def start_download(self) -> None:
        chosen = self._selected()
        if chosen is None or self.download is not None:
            return
        repo, file = chosen
        spec = f"{repo}:{file.name}"
        engine = self.engine
        self.download_button.setEnabled(False)
        self.cancel_button.setVisible(True)
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)
        self.status.setText(f"Downloading {file.name}…")

        def done(entry: ModelEntry) -> None:
            self.status.setText(f"Downloaded and registered {entry.id}.")
            self.on_pulled(entry)

        def failed(exc: BaseException) -> None:
            self.status.setText(f"Download failed: {getattr(exc, 'message', exc)}")

        def cancelled() -> None:
            self.status.setText(
                f"Cancelled. The part already downloaded is kept: Download {file.name} "
                "again to go on from there."
            )

        def finished() -> None:
            self.download = None
            self.progress.setVisible(False)
            self.cancel_button.setVisible(False)
            self._selection_changed()

        self.download = ops.run(
            lambda ctx: engine.pull_model(spec, None, ctx),
            on_success=done,
            on_failure=failed,
            on_progress=self._progressed,
            on_cancel=cancelled,
            on_finished=finished,
            parent=self,
            name="hub-pull",
        )

    def _progressed(self, p: Progress) -> None:
        if p.total:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * min(p.done / p.total, 1.0)))
            eta = p.eta_seconds
            left = f", {format_duration(eta)} left" if eta is not None else ""
            self.status.setText(
                f"{p.label}: {human_size(int(p.done))} of {human_size(int(p.total))}{left}"
            )

    def cancel_download(self) -> None:
        if self.download is not None:
            self.download.cancel()
            self.status.setText("Cancelling…")
