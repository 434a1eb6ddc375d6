"""The settings page (placeholder until it is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import Engine


class SettingsPage(QWidget):
    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("SettingsPage"))
