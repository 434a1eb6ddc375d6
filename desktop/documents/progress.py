"""Indexing in words and widgets: the progress strip (count, rate, ETA, Cancel) and the outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

if TYPE_CHECKING:
    from engine import IndexReport, Progress


def format_duration(seconds: float) -> str:
    """A duration the way people say it: "8 s", "2 min 05 s", "1 h 20 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_rate(done: float, elapsed: float) -> str:
    """Files per second, or seconds per file when files take longer than a second each."""
    if done <= 0 or elapsed <= 0:
        return ""
    rate = done / elapsed
    if rate >= 1:
        return f"{rate:.1f} files/s"
    return f"{elapsed / done:.1f} s/file"


def progress_text(progress: Progress) -> str:
    """The strip's main line: "2/40 files · 1.5 files/s · ETA 25 s"."""
    if progress.total is None:
        return "Looking for files…"
    done, total = int(progress.done), int(progress.total)
    parts = [f"{done}/{total} files"]
    rate = format_rate(progress.done, progress.elapsed)
    if rate:
        parts.append(rate)
    eta = progress.eta_seconds
    if eta is not None and done < total:
        parts.append(f"ETA {format_duration(eta)}")
    return " · ".join(parts)


def report_text(name: str, report: IndexReport) -> str:
    """What an indexing run did, in one or two sentences."""
    if report.cancelled:
        return (
            f"Indexing of {name} cancelled. {report.indexed} files indexed in this run are "
            "kept; Sync to index the rest."
        )
    parts = []
    if report.indexed:
        parts.append(f"{report.indexed} files indexed ({report.chunks} chunks)")
    if report.unchanged:
        parts.append(f"{report.unchanged} unchanged")
    if report.skipped:
        parts.append(f"{report.skipped} skipped")
    if report.removed:
        parts.append(f"{report.removed} removed")
    text = f"{name}: " + (", ".join(parts) or "nothing to index")
    text += f" in {format_duration(report.seconds)}."
    if report.failed:
        text += f" {len(report.failed)} could not be read: see the table for why."
    if report.missing_sources:
        text += f" Missing (documents kept): {', '.join(report.missing_sources)}."
    return text


class IndexingProgress(QWidget):
    """Shown while a collection indexes; ``cancel_requested`` when the user clicks Cancel."""

    cancel_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 4)
        row = QHBoxLayout()
        self.bar = QProgressBar()
        self.bar.setAccessibleName("Indexing progress")
        self.bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop indexing; files already indexed are kept")
        self.cancel_button.clicked.connect(self._on_cancel_clicked)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.label = QLabel()
        self.detail = QLabel()
        self.detail.setObjectName("hint")
        layout.addWidget(self.label)
        layout.addWidget(self.detail)
        self.hide()

    def start(self, title: str) -> None:
        """Show the strip for a new job; the bar is busy until the first count arrives."""
        self.bar.setRange(0, 0)
        self.label.setText(title)
        self.detail.setText("")
        self.cancel_button.setEnabled(True)
        self.cancel_button.setText("Cancel")
        self.show()

    def update_progress(self, progress: Progress) -> None:
        if progress.total is None or progress.total <= 0:
            self.bar.setRange(0, 0)
        else:
            self.bar.setRange(0, int(progress.total))
            self.bar.setValue(int(progress.done))
        self.label.setText(progress_text(progress))
        self.detail.setText(progress.label)

    def stop(self) -> None:
        self.hide()

    def _on_cancel_clicked(self) -> None:
        self.cancel_button.setEnabled(False)
        self.cancel_button.setText("Cancelling…")
        self.cancel_requested.emit()
