"""A training run as it happens: status line, progress bar with ETA, loss chart and log.

It is fed the throttled ``Progress`` publishes of the fine-tune operation. Each carries
the trainer's latest JSON event in ``detail`` (``start``, ``status``, ``progress``), or
none while the parent process checks and prepares the data; a publish shows only the
latest event, so the log holds one line per publish, not one per trainer event.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from desktop.finetune.chart import LossChart
from engine import Event, Progress

LOG_LINES = 5000


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 10 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class TrainingMonitor(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        self.status = QLabel("No training running.")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m steps")
        self.progress.setTextVisible(False)  # until a run says how many steps it has
        self.eta = QLabel()
        self.chart = LossChart()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setAccessibleName("Training log")
        self.log.setMaximumBlockCount(LOG_LINES)
        row = QHBoxLayout()
        row.addWidget(self.progress, 1)
        row.addWidget(self.eta)
        layout.addWidget(self.status)
        layout.addLayout(row)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.chart)
        split.addWidget(self.log)
        split.setSizes([300, 200])
        layout.addWidget(split, 1)
        self.last_step = 0
        self._last_line = ""

    def begin(self, status: str) -> None:
        """A run starts (or resumes): the log restarts; the chart is the caller's to set."""
        self.last_step = 0
        self._last_line = ""
        self.log.clear()
        self.status.setText(status)
        self.eta.clear()
        self.progress.setTextVisible(False)
        self.progress.setRange(0, 0)  # busy until the trainer says how many steps

    def append_log(self, line: str) -> None:
        if line and line != self._last_line:
            self._last_line = line
            self.log.appendPlainText(line)

    def show_progress(self, p: Progress, status: str | None) -> None:
        """One throttled publish; ``status`` replaces the status line when given."""
        detail: dict[str, Any] = dict(p.detail or {})
        event = detail.get("event")
        if event == Event.START:
            self.chart.set_total(detail.get("total_steps"))
            self.append_log(
                f"training with {detail.get('backend')} on {detail.get('device')}: "
                f"{detail.get('reason')}; {detail.get('total_steps')} steps"
            )
        elif event == Event.PROGRESS:
            step, loss = int(detail["step"]), float(detail["loss"])
            self.last_step = step
            self.chart.add_point(step, loss)
            self.append_log(
                f"step {step}/{detail.get('total_steps')}  loss {loss:.4f}  "
                f"lr {float(detail.get('lr', 0)):.2e}  "
                f"{float(detail.get('tokens_per_second', 0)):.0f} tokens/s"
            )
        else:
            self.append_log(str(detail.get("message") or p.label))
        if p.total:
            self.progress.setTextVisible(True)
            self.progress.setRange(0, int(p.total))
            self.progress.setValue(int(p.done))
            eta = p.eta_seconds
            self.eta.setText(f"about {duration(eta)} left" if eta is not None else "")
        if status is not None:
            self.status.setText(status)

    def end(self, status: str, succeeded: bool = False) -> None:
        """The run ended (done, stopped or failed): the bar stops, the status says how."""
        self.status.setText(status)
        self.append_log(status)
        self.eta.clear()
        if succeeded:
            self.progress.setValue(self.progress.maximum())
        elif self.progress.maximum() == 0:  # still busy: never got a step count
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
