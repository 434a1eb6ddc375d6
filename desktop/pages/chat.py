"""The chat page: past chats on the left; model and documents pickers, transcript, question box.

An answer is one ``ops`` operation: ``Engine.chat`` runs on a worker thread, its text goes
through a ``TextPump`` (the engine calls ``on_text`` on that thread; the pump hands the
GUI what has gathered every 30 ms), and only the streaming answer's block is updated.
Stop cancels the operation: the engine ends at the next token and keeps the partial
answer, marked interrupted.

The pickers, the history and an opened conversation are read through ``desktop.ops``
too (the GUI's threading rule): the pickers are filled, and a conversation shown, when
their read comes back. While a conversation is being opened no question can be sent:
it would go to the conversation shown before.

Regenerate asks the last question again in the same conversation. The stored history
is append-only, so the new answer comes after the earlier one and both stay (the model
also sees the earlier exchange). Replacing the last answer in place would need an engine
call that drops it before answering again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut, QShowEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from desktop import ops
from desktop.chat import citations as chat_citations
from desktop.chat.history import HistoryPanel
from desktop.chat.message import MessageWidget, describe
from desktop.chat.pickers import CollectionPicker, ModelPicker
from desktop.chat.transcript import Composer, Transcript
from engine import ChatRequest, ChatResult, ModelCrashed, SamplingParams

if TYPE_CHECKING:
    from desktop.app import MainWindow
    from engine import (
        Citation,
        Collection,
        Conversation,
        Engine,
        JobContext,
        Message,
        ModelEntry,
    )

    Models = tuple[list[ModelEntry], str | None]  # (the installed models, the default id)


class ChatPage(QWidget):
    """Chat with a local model, optionally grounded in a document collection."""

    engine_notice = Signal(str)  # emitted on the worker thread; shown on the GUI thread
    conversation_opened = Signal(int)  # a stored conversation is shown, all its messages

    def __init__(self, engine: Engine, window: MainWindow) -> None:
        super().__init__()
        self.engine = engine
        self.window_ = window
        # Longest answer, in tokens (the engine's default; tests make it small).
        self.max_tokens = SamplingParams().max_tokens
        self.conversation_id: int | None = None
        self.operation: ops.Operation | None = None
        self._pump: ops.TextPump | None = None
        self._question: MessageWidget | None = None
        self._answer: MessageWidget | None = None
        self._opening: int | None = None  # the conversation being read, to be shown

        self.history = HistoryPanel(engine, window)
        self.model_picker = ModelPicker()
        self.collection_picker = CollectionPicker()
        self.transcript = Transcript()
        self.composer = Composer()
        self.send_button = QPushButton("Send")
        self.send_button.setToolTip("Send the question (Ctrl+Enter)")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the answer (Esc); what was written is kept")
        self.stop_button.setEnabled(False)
        self._build_layout()
        self._build_shortcuts()

        self.history.conversation_selected.connect(self.open_conversation)
        self.history.conversation_deleted.connect(self._on_history_conversation_deleted)
        self.history.new_requested.connect(self.new_chat)
        self.composer.submitted.connect(self.send)
        self.send_button.clicked.connect(self._on_send_button_clicked)
        self.stop_button.clicked.connect(self.stop)
        self.collection_picker.currentIndexChanged.connect(self._on_collection_changed)
        self.engine_notice.connect(self.window_.notify)
        self._models = ops.Refresher(
            self._models_job, self._show_models, parent=self, name="chat-models"
        )
        self._collections = ops.Refresher(
            self._collections_job, self._show_collections, parent=self, name="chat-collections"
        )

    def _build_layout(self) -> None:
        bar = QHBoxLayout()
        model_label = QLabel("&Model")
        model_label.setBuddy(self.model_picker)
        documents_label = QLabel("&Documents")
        documents_label.setBuddy(self.collection_picker)
        for widget in (model_label, self.model_picker, documents_label, self.collection_picker):
            bar.addWidget(widget)
        bar.addStretch(1)

        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        bottom = QHBoxLayout()
        bottom.addWidget(self.composer, 1)
        bottom.addLayout(buttons)

        right = QWidget()
        column = QVBoxLayout(right)
        column.setContentsMargins(4, 8, 8, 8)
        column.addLayout(bar)
        column.addWidget(self.transcript, 1)
        column.addLayout(bottom)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.history)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([260, 900])
        self.history.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter)

        # Find, pick, then choose what to ask with and ask.
        order = [
            self.history.search_box,
            self.history.new_button,
            self.history.conversation_list,
            self.history.rename_button,
            self.history.export_button,
            self.history.delete_button,
            self.model_picker,
            self.collection_picker,
            self.composer,
            self.send_button,
            self.stop_button,
        ]
        for first, second in itertools.pairwise(order):
            QWidget.setTabOrder(first, second)

    def _build_shortcuts(self) -> None:
        # Window shortcuts of a page only fire while the page is the one shown.
        def shortcut(key: str, slot: Callable[[], object]) -> QShortcut:
            item = QShortcut(QKeySequence(key), self)
            item.setContext(Qt.ShortcutContext.WindowShortcut)
            item.activated.connect(slot)
            return item

        # Esc is taken only while an answer streams, so it still closes popups otherwise.
        self.stop_shortcut = shortcut("Esc", self.stop)
        self.stop_shortcut.setEnabled(False)
        shortcut("Ctrl+N", self.new_chat)
        shortcut("Ctrl+F", self.focus_search)
        shortcut("Ctrl+R", self.regenerate)

    # -- pickers -----------------------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:
        """Models and collections change on other pages: read them again when shown."""
        super().showEvent(event)
        if not self.busy:
            self.refresh_models()
            self.refresh_collections()
            self.history.reload()

    def refresh_models(self, then: Callable[[], None] | None = None) -> None:
        """Fill the model picker from the registry, keeping the choice (else the default).

        ``then`` runs once the picker shows a read that began after this call.
        """
        self._models.refresh(then)

    def _models_job(self) -> Callable[[JobContext], Models]:
        engine = self.engine

        def read(_: JobContext) -> Models:
            models = engine.list_models()
            return models, engine.default_model_id() if models else None

        return read

    def _show_models(self, found: Models) -> None:
        self.model_picker.fill(*found)

    def refresh_collections(self) -> None:
        """``No documents`` plus every collection, keeping the choice when it still exists."""
        self._collections.refresh()

    def _collections_job(self) -> Callable[[JobContext], list[tuple[Collection, dict[str, int]]]]:
        engine = self.engine
        return lambda _: engine.documents.all()

    def _show_collections(self, collections: list[tuple[Collection, dict[str, int]]]) -> None:
        self.collection_picker.fill(collections)

    @property
    def loading(self) -> bool:
        """Whether a read of this page (pickers, history, a conversation) or a rating is
        still running -- everything but the answer being written (``busy``)."""
        return any(op is not self.operation for op in ops.running(self))

    def select_model(self, model_id: str | None) -> bool:
        return self.model_picker.select(model_id)

    def model_id(self) -> str | None:
        return self.model_picker.model_id()

    def collection(self) -> str | None:
        return self.collection_picker.collection()

    def _on_collection_changed(self, *_: object) -> None:
        name = self.collection()
        self.composer.setPlaceholderText(
            f"Ask about the documents in “{name}”… (Ctrl+Enter to send)"
            if name
            else "Ask anything… (Ctrl+Enter to send)"
        )

    # -- conversations -----------------------------------------------------------------

    def new_chat(self, model_id: str | None = None) -> None:
        """Start an empty conversation, with ``model_id`` picked when given."""
        if self.busy:
            self.window_.notify("An answer is still being written: stop it first (Esc).")
            return
        self.conversation_id = None
        self.transcript.clear()
        self.history.select(None)
        self._opening = None
        if model_id is not None:
            # Read again first: a fine-tune that just finished is not listed yet.
            self.refresh_models(then=lambda: self._pick_model(model_id))
        self.composer.setFocus()

    def _pick_model(self, model_id: str) -> None:
        if not self.select_model(model_id):
            self.window_.notify(f"The model {model_id} is not installed.", "error")

    def open_conversation(self, conversation_id: int) -> None:
        """Show a stored conversation (once it is read); the next question continues it."""
        if self.busy:
            return
        self._opening = conversation_id
        engine = self.engine

        def failed(exc: BaseException) -> None:
            # Shown unless the user has moved on (another chat opened, or a new one).
            if self._opening == conversation_id:
                self._opening = None
                self.window_.show_error(exc)
                self.history.reload()

        ops.run(
            lambda _: engine.get_conversation(conversation_id),
            on_success=lambda found: self._show_conversation(conversation_id, *found),
            on_failure=failed,
            parent=self,
            name="open-conversation",
            native=False,
        )

    def _show_conversation(
        self, conversation_id: int, conversation: Conversation, messages: list[Message]
    ) -> None:
        if self._opening != conversation_id or self.busy:
            return  # another one was opened meanwhile, or a new chat started
        self._opening = None
        self.conversation_id = conversation.id
        self.transcript.clear()
        for message in messages:
            if message.role == "user":
                self.transcript.add(MessageWidget("user", message.content))
            elif message.role == "assistant":
                answer = self._new_answer(message.model or "Assistant", streaming=False)
                status = describe(
                    message.completion_tokens,
                    message.tokens_per_second,
                    "cancelled" if message.interrupted else None,
                )
                answer.finish(
                    message.content,
                    message_id=message.id,
                    citations=message.citations,
                    status=status,
                    interrupted=message.interrupted,
                    rating=message.rating,
                    correction=message.correction,
                )
        if conversation.model:
            self.select_model(conversation.model)
        self.history.select(conversation.id)
        self._update_regenerate()
        self.transcript.follow()
        self.conversation_opened.emit(conversation.id)

    def _on_history_conversation_deleted(self, conversation_id: int) -> None:
        if conversation_id == self.conversation_id:
            self.new_chat()

    def focus_search(self) -> None:
        self.history.search_box.setFocus(Qt.FocusReason.ShortcutFocusReason)
        self.history.search_box.selectAll()

    # -- asking ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.operation is not None

    def build_request(self, prompt: str) -> ChatRequest:
        """The request for ``prompt`` with what the page shows: model, collection, chat."""
        return ChatRequest(
            prompt=prompt,
            model_id=self.model_id(),
            conversation_id=self.conversation_id,
            sampling=SamplingParams(max_tokens=self.max_tokens),
            collection=self.collection(),
        )

    def send(self, prompt: str | None = None) -> bool:
        """Ask ``prompt`` (or what is in the question box). False when nothing was sent."""
        if self.busy or self._opening is not None:
            return False
        text = (prompt if prompt is not None else self.composer.toPlainText()).strip()
        if not text:
            return False
        request = self.build_request(text)
        if prompt is None:
            self.composer.clear()
        self._question = self.transcript.add(MessageWidget("user", text))
        answer = self._new_answer(request.model_id or "Assistant", streaming=True)
        self._answer = answer
        self.transcript.follow()
        pump = ops.TextPump(self)
        pump.text.connect(answer.append_text)
        pump.start()
        self._pump = pump
        engine, notice = self.engine, self.engine_notice

        def answer_question(ctx: JobContext) -> ChatResult:
            return engine.chat(request, ctx, pump.push, notice.emit)

        self.operation = ops.run(
            answer_question,
            on_success=self._on_chat_succeeded,
            on_failure=self._on_chat_failed,
            on_cancel=self._on_chat_cancelled,
            on_finished=self._on_chat_finished,
            parent=self,
            name="chat",
        )
        self._set_busy(True)
        return True

    def _on_send_button_clicked(self) -> None:
        self.send()

    def stop(self) -> None:
        """Stop the answer being written; the engine keeps it, marked interrupted."""
        if self.operation is not None:
            self.operation.cancel()
            if self._answer is not None:
                self._answer.status_label.setText("stopping…")

    def regenerate(self) -> None:
        """Ask the last question again (see the module docstring for what is kept)."""
        question = self.transcript.last("user")
        if self.busy or question is None or self.conversation_id is None:
            return
        self.send(question.text())

    def _new_answer(self, author: str, *, streaming: bool) -> MessageWidget:
        answer = MessageWidget("assistant", author=author, streaming=streaming)
        answer.rated.connect(lambda message_id, rating: self.rate(answer, message_id, rating))
        answer.regenerate_requested.connect(self.regenerate)
        answer.correct_requested.connect(lambda message_id: self.correct(answer, message_id))
        answer.citation_opened.connect(self.open_citation)
        return self.transcript.add(answer)

    def open_citation(self, citation: Citation) -> None:
        """Show a cited source (the hook is looked up at call time: tests replace it)."""
        chat_citations.open_citation(self, citation, self.engine)

    def rate(self, answer: MessageWidget, message_id: int, rating: int) -> None:
        """Keep a thumbs up/down with the message; the buttons show it once it is stored."""
        engine = self.engine
        ops.run(
            lambda _: engine.rate_message(message_id, rating),
            on_success=lambda _: answer.set_rating(rating),
            parent=answer,  # a message no longer shown is not updated
            name="rate-message",
            native=False,
        )

    def correct(self, answer: MessageWidget, message_id: int) -> None:
        """Ask for a better answer; kept beside the model's own (see ``save_correction``)."""
        text, ok = QInputDialog.getMultiLineText(
            self,
            "Correct the answer",
            "A better answer. The model's own is kept too; corrected answers become "
            "fine-tuning data (Fine-tune page, Use feedback). Leave empty to remove.",
            answer.correction or answer.text(),
        )
        if ok:
            self.save_correction(answer, message_id, text)

    def save_correction(self, answer: MessageWidget, message_id: int, text: str) -> None:
        engine = self.engine
        value = text if text.strip() else None
        ops.run(
            lambda _: engine.correct_message(message_id, value),
            on_success=lambda _: answer.set_correction(value),
            parent=answer,
            name="correct-message",
            native=False,
        )

    # -- the answer's end --------------------------------------------------------------

    def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.stop()  # hands over what is left before the answer is finished
            self._pump.deleteLater()
            self._pump = None

    def _on_chat_succeeded(self, result: ChatResult) -> None:
        self._stop_pump()
        self.conversation_id = result.conversation_id
        if self._answer is not None:
            self._answer.author_label.setText(result.model)
            self._answer.finish(
                result.answer,
                message_id=result.message_id,
                citations=result.citations,
                status=describe(
                    result.completion_tokens, result.tokens_per_second, result.stop_reason
                ),
                interrupted=result.interrupted,
            )
        self.history.select(result.conversation_id)
        self.history.reload()

    def _on_chat_failed(self, exc: BaseException) -> None:
        self._stop_pump()
        self.window_.show_error(exc)
        if self._answer is not None and not self._answer.text():
            self._take_back_question()  # nothing was answered: the question can be sent again
        elif self._answer is not None:
            if isinstance(exc, ModelCrashed):
                if exc.conversation_id is not None:  # the partial answer is kept there
                    self.conversation_id = exc.conversation_id
                    self.history.select(exc.conversation_id)
                self._answer.fail("interrupted: the model process ended")
            else:
                self._answer.fail("failed before the end")
        self.history.reload()

    def _on_chat_cancelled(self) -> None:
        # Stopped before the model started: the engine stored nothing.
        self._stop_pump()
        self._take_back_question()

    def _take_back_question(self) -> None:
        if self._question is not None:
            if not self.composer.toPlainText().strip():
                self.composer.setPlainText(self._question.text())
            self.transcript.remove(self._question)
        if self._answer is not None:
            self.transcript.remove(self._answer)
        self._question = self._answer = None

    def _on_chat_finished(self) -> None:
        self.operation = None
        self._question = self._answer = None
        self._set_busy(False)
        self._update_regenerate()
        self.composer.setFocus()

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.stop_shortcut.setEnabled(busy)
        # One answer at a time, in the conversation it was asked in.
        self.history.setEnabled(not busy)
        self.model_picker.setEnabled(not busy)
        self.collection_picker.setEnabled(not busy)
        if busy:
            self._update_regenerate()

    def _update_regenerate(self) -> None:
        last = self.transcript.last("assistant")
        for message in self.transcript.messages():
            message.set_regenerate_visible(
                message is last and not self.busy and self.conversation_id is not None
            )
