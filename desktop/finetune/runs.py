"""The table of past fine-tune runs (name, status, step), to resume or revisit one."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from engine import RunRecord

RESUMABLE = ("stopped", "failed")


class RunsTable(QTableWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 3, parent)
        self.setAccessibleName("Past runs")
        self.setHorizontalHeaderLabels(["Run", "Status", "Step"])
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.setMaximumHeight(160)
        self.records: list[RunRecord] = []

    def set_runs(self, records: list[RunRecord], select: str | None = None) -> None:
        """Show ``records``, selecting ``select`` (else the run selected before)."""
        if select is None and (current := self.selected_run()) is not None:
            select = current.name
        self.records = records
        self.blockSignals(True)
        self.clearSelection()
        self.setRowCount(len(records))
        for row, run in enumerate(records):
            step = f"{run.step} / {run.total_steps}" if run.total_steps else str(run.step)
            for column, text in enumerate((run.name, run.status, step)):
                item = QTableWidgetItem(text)
                if run.error:
                    item.setToolTip(run.error)
                self.setItem(row, column, item)
            if run.name == select:
                self.selectRow(row)
        self.blockSignals(False)

    def selected_run(self) -> RunRecord | None:
        rows = {index.row() for index in self.selectedIndexes()}
        return self.records[rows.pop()] if len(rows) == 1 else None

    def select_run(self, name: str) -> None:
        for row, run in enumerate(self.records):
            if run.name == name:
                self.selectRow(row)
