"""One message of the transcript: its text, and for answers copy, regenerate, thumbs, sources.

A finished message is rendered once and never touched again. The one answer that is
streaming appends each batch of text at the end of its document (Qt lays out only the
changed lines), and re-reads its whole text as Markdown at most every
``MARKDOWN_INTERVAL_MS`` -- so the cost of a batch does not grow with the length of the
conversation, nor, for the most part, with the length of the answer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QContextMenuEvent, QGuiApplication, QTextCursor, QTextOption
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from desktop.chat.citations import CitationChips
from desktop.chat.markdown import code_at, render_markdown
from engine import Citation

# While streaming, the answer is re-read as Markdown this often; plain text in between.
MARKDOWN_INTERVAL_MS = 400
# Past this size the streaming answer stays plain until it is done: a re-render costs in
# proportion to the text, and a very long answer would make each one noticeable.
LIVE_MARKDOWN_MAX_CHARS = 20_000

STOP_REASONS = {
    "cancelled": "interrupted",
    "length": "cut at the token limit",
    "context": "cut: the context window is full",
    "no_sources": "no matching sources",
}


def describe(
    completion_tokens: int | None, tokens_per_second: float | None, stop_reason: str | None
) -> str:
    """The line under an answer: ``48 tokens · 31.2 tok/s · interrupted``."""
    parts = []
    if completion_tokens:
        parts.append(f"{completion_tokens} tokens")
    if tokens_per_second:
        parts.append(f"{tokens_per_second:.1f} tok/s")
    if stop_reason in STOP_REASONS:
        parts.append(STOP_REASONS[stop_reason])
    return " · ".join(parts)


class MessageText(QTextBrowser):
    """Read-only rich text that is exactly as tall as its content (no inner scroll bar)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        # Links in model output are shown, never followed: an offline workstation does not
        # open a browser because a model wrote a URL.
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        # Tab moves between controls, not into every message.
        self.setFocusPolicy(Qt.FocusPolicy.ClickFocus)
        self.viewport().setAutoFillBackground(False)
        layout = self.document().documentLayout()
        layout.documentSizeChanged.connect(self._fit_height)
        self._fit_height()

    def _fit_height(self, *_: object) -> None:
        height = math.ceil(self.document().size().height()) + 2 * self.frameWidth()
        if height != self.height():
            self.setFixedHeight(max(height, 1))

    def sizeHint(self) -> QSize:
        return QSize(super().sizeHint().width(), self.height())

    def contextMenuEvent(self, event: QContextMenuEvent) -> None:
        """The usual menu, plus "Copy code block" when the click is inside code."""
        menu = self.createStandardContextMenu(event.pos())
        code = code_at(self.cursorForPosition(event.pos()))
        if code is not None:
            menu.addSeparator()
            action = menu.addAction("Copy code block")
            action.triggered.connect(lambda: QGuiApplication.clipboard().setText(code))
        menu.exec(event.globalPos())
        menu.deleteLater()


class MessageWidget(QFrame):
    """A user question or a model's answer, as one block of the transcript."""

    rated = Signal(int, int)  # message id, rating (1, -1, or 0 when cleared)
    correct_requested = Signal(int)  # message id: the user wants to write a better answer
    regenerate_requested = Signal()
    citation_opened = Signal(object)  # a Citation whose chip was clicked

    def __init__(
        self, role: str, text: str = "", *, author: str = "", streaming: bool = False
    ) -> None:
        super().__init__()
        self.role = role
        self.message_id: int | None = None
        self.rating = 0
        self.correction: str | None = None
        self.interrupted = False
        self.streaming = streaming
        self.batches = 0  # text batches received while streaming (tests count them)
        self._parts: list[str] = [text] if text else []
        self.setObjectName("userMessage" if role == "user" else "answerMessage")
        self.setFrameShape(QFrame.Shape.StyledPanel if role == "user" else QFrame.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 6)
        layout.setSpacing(4)

        header = QHBoxLayout()
        self.author_label = QLabel(author or ("You" if role == "user" else "Assistant"))
        font = self.author_label.font()
        font.setBold(True)
        self.author_label.setFont(font)
        self.status_label = QLabel()
        self.status_label.setObjectName("messageStatus")
        self.status_label.setEnabled(False)  # the disabled colour reads as secondary text
        header.addWidget(self.author_label)
        header.addWidget(self.status_label)
        header.addStretch(1)
        layout.addLayout(header)

        self.view = MessageText()
        self.view.setAccessibleName(f"{self.author_label.text()} message")
        layout.addWidget(self.view)
        self.chips: CitationChips | None = None
        self._chips_slot = QVBoxLayout()
        self._chips_slot.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._chips_slot)
        self.correction_label = QLabel()
        self.correction_label.setObjectName("messageCorrection")
        self.correction_label.setWordWrap(True)
        self.correction_label.setTextInteractionFlags(
            self.correction_label.textInteractionFlags().TextSelectableByMouse
        )
        self.correction_label.hide()
        layout.addWidget(self.correction_label)

        self.action_bar = QWidget()
        row = QHBoxLayout(self.action_bar)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(2)
        self.copy_button = self._tool("Copy", "Copy the answer (Markdown)")
        self.copy_button.clicked.connect(self.copy)
        self.regenerate_button = self._tool("Regenerate", "Ask the same question again (Ctrl+R)")
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        # Words, not thumb emoji: not every Linux desktop has a font with those.
        self.up_button = self._tool("▲ Good", "Good answer (kept for fine-tuning data)")
        self.down_button = self._tool("▼ Bad", "Bad answer (kept for fine-tuning data)")
        for button, value in ((self.up_button, 1), (self.down_button, -1)):
            button.setCheckable(True)
            button.clicked.connect(lambda _=False, v=value: self._on_thumb_clicked(v))
        self.correct_button = self._tool(
            "Correct…", "Write a better answer (both are kept; used for fine-tuning data)"
        )
        self.correct_button.clicked.connect(self._on_correct_clicked)
        for button in (
            self.copy_button,
            self.regenerate_button,
            self.up_button,
            self.down_button,
            self.correct_button,
        ):
            row.addWidget(button)
        row.addStretch(1)
        layout.addWidget(self.action_bar)
        self.action_bar.setVisible(role == "assistant" and not streaming)
        self.regenerate_button.hide()

        self._markdown_timer = QTimer(self)
        self._markdown_timer.setSingleShot(True)
        self._markdown_timer.setInterval(MARKDOWN_INTERVAL_MS)
        self._markdown_timer.timeout.connect(self._render_live)
        if streaming:
            self.status_label.setText("thinking…")
        elif role == "user":
            self.view.setPlainText(text)  # what the user typed is shown as typed
        else:
            self.render_text()

    @staticmethod
    def _tool(text: str, tip: str) -> QToolButton:
        button = QToolButton()
        button.setText(text)
        button.setToolTip(tip)
        button.setAccessibleName(tip)
        button.setAutoRaise(True)
        return button

    # -- content -----------------------------------------------------------------------

    def text(self) -> str:
        """The message's source text (Markdown for answers)."""
        return "".join(self._parts)

    def render_text(self) -> None:
        """Show the whole text as Markdown (answers) -- once, when it is final."""
        render_markdown(self.view.document(), self.text(), self.palette())

    def append_text(self, piece: str) -> None:
        """Add a streamed batch: appended at the end, the rest of the document untouched."""
        if not piece:
            return
        if not self._parts:
            self.status_label.setText("")
        self._parts.append(piece)
        self.batches += 1
        cursor = QTextCursor(self.view.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(piece)
        if not self._markdown_timer.isActive():
            self._markdown_timer.start()

    def _render_live(self) -> None:
        if self.streaming and sum(map(len, self._parts)) <= LIVE_MARKDOWN_MAX_CHARS:
            self.render_text()

    def finish(
        self,
        text: str,
        *,
        message_id: int | None,
        citations: Sequence[Citation] = (),
        status: str = "",
        interrupted: bool = False,
        rating: int = 0,
        correction: str | None = None,
    ) -> None:
        """Make the answer final: its stored text as Markdown, sources, figures, actions."""
        self._markdown_timer.stop()
        self.streaming = False
        self._parts = [text]
        self.message_id = message_id
        self.interrupted = interrupted
        if text.strip():
            self.render_text()
        else:
            self.view.setPlainText("")
            status = ", ".join(s for s in ("no text", status) if s)
        self.status_label.setText(status)
        if citations:
            self.chips = CitationChips(citations)
            self.chips.opened.connect(self.citation_opened)
            self._chips_slot.addWidget(self.chips)
        self.set_rating(rating)
        self.set_correction(correction)
        self.action_bar.setVisible(message_id is not None)

    def fail(self, reason: str) -> None:
        """The answer could not be produced; what streamed (if anything) stays visible."""
        self._markdown_timer.stop()
        self.streaming = False
        self.interrupted = True
        if self._parts:
            self.render_text()
        self.status_label.setText(reason)

    # -- actions -----------------------------------------------------------------------

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(self.text())

    def set_rating(self, rating: int) -> None:
        self.rating = rating
        self.up_button.setChecked(rating == 1)
        self.down_button.setChecked(rating == -1)

    def set_correction(self, text: str | None) -> None:
        """Show the user's corrected answer under the model's own (None: there is none)."""
        self.correction = text
        self.correction_label.setVisible(bool(text))
        self.correction_label.setText(f"<b>Your correction:</b> {html.escape(text or '')}")
        self.correct_button.setText("Edit correction…" if text else "Correct…")

    def _on_correct_clicked(self) -> None:
        if self.message_id is not None:
            self.correct_requested.emit(self.message_id)

    def set_regenerate_visible(self, visible: bool) -> None:
        self.regenerate_button.setVisible(visible)

    def _on_thumb_clicked(self, value: int) -> None:
        new = 0 if self.rating == value else value
        # The buttons show the stored state, not the click: the page sets it once saved.
        self.set_rating(self.rating)
        if self.message_id is not None:
            self.rated.emit(self.message_id, new)
