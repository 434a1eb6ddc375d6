"""The model picker and the documents (collection) picker above the transcript."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QWidget

if TYPE_CHECKING:
    from engine import Collection, ModelEntry

NO_DOCUMENTS = "No documents"


class ModelPicker(QComboBox):
    """Installed models by id; a fine-tune says which base it was trained from."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Model")
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)

    def fill(self, models: Sequence[ModelEntry], default: str | None) -> None:
        """List ``models``, keeping the current choice if it is still there, else ``default``."""
        chosen = self.model_id() or default
        self.blockSignals(True)
        self.clear()
        for entry in models:
            label = entry.id if entry.base is None else f"{entry.id} (fine-tune of {entry.base})"
            self.addItem(label, entry.id)
            self.setItemData(self.count() - 1, entry.path, Qt.ItemDataRole.ToolTipRole)
        self.blockSignals(False)
        if not self.select(chosen):
            self.select(default)

    def select(self, model_id: str | None) -> bool:
        """Choose ``model_id``; False (and no change) when it is not listed."""
        index = self.findData(model_id) if model_id else -1
        if index >= 0:
            self.setCurrentIndex(index)
        return index >= 0

    def model_id(self) -> str | None:
        data = self.currentData()
        return str(data) if data else None


class CollectionPicker(QComboBox):
    """``No documents`` (plain chat), then every document collection by name."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Documents to answer from")
        self.setToolTip("Answer from a document collection, with citations")
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)

    def fill(self, collections: Sequence[tuple[Collection, dict[str, int]]]) -> None:
        """List the collections, keeping the current choice when it still exists."""
        chosen = self.collection()
        self.blockSignals(True)
        self.clear()
        self.addItem(NO_DOCUMENTS, None)
        for collection, summary in collections:
            self.addItem(collection.name, collection.name)
            tip = f"{summary.get('indexed', 0)} files indexed, {summary.get('chunks', 0)} passages"
            self.setItemData(self.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        index = self.findData(chosen) if chosen else 0
        self.setCurrentIndex(max(index, 0))
        self.blockSignals(False)
        if self.collection() != chosen:
            self.currentIndexChanged.emit(self.currentIndex())

    def collection(self) -> str | None:
        data = self.currentData()
        return str(data) if data else None
