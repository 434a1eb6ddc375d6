"""The transcript (a scrolling column of message blocks) and the box the user types into."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QLabel, QPlainTextEdit, QScrollArea, QVBoxLayout, QWidget

from desktop.chat.message import MessageWidget

# Within this many pixels of the bottom counts as "at the bottom": the view follows new text.
FOLLOW_SLACK_PX = 24
EMPTY_TEXT = (
    "Ask anything. <b>Ctrl+Enter</b> sends, <b>Esc</b> stops the answer, "
    "<b>Ctrl+N</b> starts a new chat, <b>Ctrl+F</b> searches past chats."
)


class Transcript(QScrollArea):
    """Message blocks top to bottom; follows the newest text while the user is at the bottom.

    Scrolling up to read an earlier message stops the following; scrolling back to the
    bottom (or sending a question) starts it again.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.setAccessibleName("Transcript")
        body = QWidget()
        self._layout = QVBoxLayout(body)
        self._layout.setContentsMargins(12, 12, 12, 12)
        self._layout.setSpacing(10)
        self.empty_label = QLabel(EMPTY_TEXT)
        self.empty_label.setWordWrap(True)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setEnabled(False)
        self._layout.addWidget(self.empty_label)
        self._layout.addStretch(1)
        self.setWidget(body)
        self._messages: list[MessageWidget] = []
        self._follow = True
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scrollbar_value_changed)
        bar.rangeChanged.connect(self._on_scrollbar_range_changed)

    def messages(self) -> list[MessageWidget]:
        return list(self._messages)

    def add(self, message: MessageWidget) -> MessageWidget:
        self.empty_label.hide()
        # Before the stretch that keeps short transcripts at the top.
        self._layout.insertWidget(self._layout.count() - 1, message)
        self._messages.append(message)
        return message

    def remove(self, message: MessageWidget) -> None:
        if message in self._messages:
            self._messages.remove(message)
            self._layout.removeWidget(message)
            message.deleteLater()
        self.empty_label.setVisible(not self._messages)

    def clear(self) -> None:
        for message in self._messages:
            self._layout.removeWidget(message)
            message.deleteLater()
        self._messages = []
        self.empty_label.show()
        self._follow = True

    def last(self, role: str) -> MessageWidget | None:
        for message in reversed(self._messages):
            if message.role == role:
                return message
        return None

    def follow(self) -> None:
        """Jump to the bottom and keep following new text."""
        self._follow = True
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def _on_scrollbar_value_changed(self, value: int) -> None:
        self._follow = value >= self.verticalScrollBar().maximum() - FOLLOW_SLACK_PX

    def _on_scrollbar_range_changed(self, _minimum: int, maximum: int) -> None:
        if self._follow:
            self.verticalScrollBar().setValue(maximum)


class Composer(QPlainTextEdit):
    """Where the question is typed: Enter makes a new line, Ctrl+Enter sends.

    Ctrl+Enter is handled here rather than by a window shortcut: a text box takes the
    keys it understands before shortcuts see them, and Enter is one of those.
    """

    submitted = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setPlaceholderText("Ask anything… (Ctrl+Enter to send)")
        self.setAccessibleName("Question")
        self.setTabChangesFocus(True)
        self.setMinimumHeight(56)
        self.setMaximumHeight(110)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        send_keys = (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        if event.key() in send_keys and event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            event.accept()
            self.submitted.emit()
            return
        super().keyPressEvent(event)
