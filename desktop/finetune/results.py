"""A finished fine-tune: its numbers, its report (report.md with loss.svg), and "Chat with it"."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QUrl, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QTextBrowser, QVBoxLayout, QWidget

from engine import FinetuneResult


def _loss(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


class ResultView(QWidget):
    """Shows a ``FinetuneResult``; ``chat_requested(model_id)`` and
    ``compare_requested(model_id, against)`` (blind A/B with the model it improves on)."""

    chat_requested = Signal(str)
    compare_requested = Signal(str, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        self.heading = QLabel("When a fine-tune finishes, its evaluation report shows here.")
        self.heading.setWordWrap(True)
        self.numbers = QLabel()
        self.numbers.setWordWrap(True)
        self.chat_button = QPushButton("Chat with this model")
        self.chat_button.setEnabled(False)
        self.chat_button.clicked.connect(self._on_chat_button_clicked)
        self.compare_button = QPushButton("Compare blind (A/B)")
        self.compare_button.setToolTip("Ask this model and the one it improves on, blind")
        self.compare_button.setEnabled(False)
        self.compare_button.clicked.connect(self._on_compare_button_clicked)
        row = QHBoxLayout()
        row.addWidget(self.numbers, 1)
        row.addWidget(self.chat_button)
        row.addWidget(self.compare_button)
        self.report = QTextBrowser()
        self.report.setAccessibleName("Fine-tune report")
        self.report.setOpenLinks(False)  # the report links nowhere; never leave the page
        layout.addWidget(self.heading)
        layout.addLayout(row)
        layout.addWidget(self.report, 1)
        self.result: FinetuneResult | None = None

    def show_result(self, result: FinetuneResult) -> None:
        self.result = result
        self.heading.setText(
            f"<b>{result.model}</b> is ready: base {result.base or '?'}, "
            f"{result.steps if result.steps is not None else '?'} steps with {result.backend} "
            f"on {result.device or '?'}."
        )
        self.numbers.setText(
            f"Training loss {_loss(result.train_loss)} · validation loss "
            f"{_loss(result.eval_loss_before)} → {_loss(result.eval_loss_after)}"
            f" · {result.tokens_per_second or 0:,.0f} tokens/s"
        )
        self.chat_button.setEnabled(True)
        self.compare_button.setEnabled(bool(result.continued_from or result.base))
        report = Path(result.report)
        if report.is_file():
            # setSource resolves "loss.svg" next to report.md (Qt's SVG image plugin draws
            # it); the search path covers a document set by text as well.
            self.report.setSearchPaths([str(report.parent)])
            self.report.setSource(QUrl.fromLocalFile(str(report)))
        else:
            self.report.setPlainText(f"The report file is missing: {report}")

    def clear(self) -> None:
        self.result = None
        self.heading.setText("When a fine-tune finishes, its evaluation report shows here.")
        self.numbers.clear()
        self.chat_button.setEnabled(False)
        self.compare_button.setEnabled(False)
        self.report.clear()

    def _on_chat_button_clicked(self) -> None:
        if self.result is not None:
            self.chat_requested.emit(self.result.model)

    def _on_compare_button_clicked(self) -> None:
        result = self.result
        against = result and (result.continued_from or result.base)
        if result is not None and against:
            self.compare_requested.emit(result.model, against)
