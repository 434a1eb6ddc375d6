"""The dataset preview: the engine's check of a training file and what redaction would do.

The page asks ``Training.preview_dataset`` on a worker thread (the check: format, counts,
every bad line, personal data found; then a dry run of the preparation, deleted before it
returns) and hands the ``DatasetPreview`` to this widget. The redaction sample holds the
very personal data that was removed -- that is its purpose, a before/after to review --
and lives only in this widget's memory.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine import DatasetPreview

MAX_BAD_ROWS = 500  # the summary gives the full count; a table of thousands helps no one


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "none found"


def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setWordWrap(True)
    header = table.horizontalHeader()
    header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
    for column in range(1, len(headers)):
        header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch)
    return table


def _fit_height(table: QTableWidget, limit: int = 180) -> None:
    """As tall as its rows (up to ``limit``), so a one-line table takes one line."""
    table.resizeRowsToContents()
    rows = sum(table.rowHeight(r) for r in range(table.rowCount()))
    frame = 2 * table.frameWidth()
    table.setFixedHeight(min(limit, table.horizontalHeader().height() + rows + frame + 2))


class PreviewView(QWidget):
    """Shows a ``DatasetPreview``: summary, bad lines, personal data, redaction."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.summary = QLabel("Choose a JSONL file to see what it holds before training.")
        self.summary.setWordWrap(True)
        self.bad_lines = _table(["Line", "Problem"])
        self.bad_lines.setAccessibleName("Bad lines")
        self.pii = QLabel()
        self.pii.setWordWrap(True)
        self.redaction = QLabel()
        self.redaction.setWordWrap(True)
        self.sample = _table(["Line", "Before", "After"])
        self.sample.setAccessibleName("Redaction sample")
        for widget in (self.summary, self.bad_lines, self.pii, self.redaction, self.sample):
            layout.addWidget(widget)
        self.result: DatasetPreview | None = None
        self._reset()

    @property
    def bad_line_count(self) -> int:
        return len(self.result.check.bad_lines) if self.result else 0

    @property
    def usable(self) -> bool:
        """Whether the data shown can be trained on: no bad line and some examples."""
        return bool(self.result and not self.bad_line_count and self.result.check.examples)

    def _reset(self) -> None:
        self.result = None
        for widget in (self.bad_lines, self.pii, self.redaction, self.sample):
            widget.hide()
        self.bad_lines.setRowCount(0)
        self.sample.setRowCount(0)

    def show_running(self, path: Path) -> None:
        self._reset()
        self.summary.setText(f"Checking {path.name}…")

    def show_failed(self, message: str) -> None:
        self._reset()
        self.summary.setText(f"The file could not be checked: {message}")

    def clear(self) -> None:
        self._reset()
        self.summary.setText("Choose a JSONL file to see what it holds before training.")

    def show_result(self, result: DatasetPreview) -> None:
        self._reset()
        self.result = result
        check, prepared = result.check, result.prepared
        about = "≈" if check.tokens_estimated else ""
        lines = [
            f"Format <b>{check.format}</b> · {check.examples} examples · "
            f"{about}{check.tokens:,} tokens (counted with {check.tokenizer}) · "
            f"{check.too_long} longer than {check.max_tokens} tokens "
            "(cut at training)"
        ]
        bad = check.bad_lines
        if bad:
            lines.append(f"<b style='color:#c0392b'>{len(bad)} bad line(s): fix them to train</b>")
        elif not check.examples:
            lines.append("<b style='color:#c0392b'>No examples: nothing to train on</b>")
        if prepared is not None:
            lines.append(
                f"Prepared: {prepared.examples_out} of {prepared.examples_in} kept "
                f"({prepared.duplicates_removed} duplicates removed) · {prepared.train} "
                f"train, {prepared.validation} validation "
                f"(a {result.val_fraction:.0%} split)"
            )
        self.summary.setText("<br>".join(lines))
        if bad:
            self.bad_lines.setRowCount(min(len(bad), MAX_BAD_ROWS))
            for row, item in enumerate(bad[:MAX_BAD_ROWS]):
                self.bad_lines.setItem(row, 0, QTableWidgetItem(str(item.line)))
                self.bad_lines.setItem(row, 1, QTableWidgetItem(item.error))
            self.bad_lines.show()
            _fit_height(self.bad_lines)
        self.pii.setText(f"Personal data found: {_counts(check.pii)}")
        self.pii.show()
        if prepared is None:
            return
        names = (
            ""
            if prepared.person_names_redacted
            else " Person names are not redacted (no offline name recognizer ships)."
        )
        self.redaction.setText(f"Redaction replaces: {_counts(prepared.redactions)}.{names}")
        self.redaction.show()
        sample = prepared.sample
        if sample:
            self.sample.setRowCount(len(sample))
            for row, redacted in enumerate(sample):
                values = (str(redacted.line), redacted.before, redacted.after)
                for column, value in enumerate(values):
                    self.sample.setItem(row, column, QTableWidgetItem(value))
            self.sample.show()
            _fit_height(self.sample, 240)
