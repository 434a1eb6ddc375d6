"""The chat page on the real engine and the default model: streaming, stop, history, ratings."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QMessageBox

from desktop.app import MainWindow
from desktop.chat import citations as chat_citations
from desktop.chat.markdown import code_blocks, is_code_block
from desktop.chat.message import MessageWidget
from desktop.chat.pickers import NO_DOCUMENTS
from desktop.pages.chat import ChatPage
from engine import Citation
from tests.conftest import DEFAULT_MODEL

GENERATION_TIMEOUT_MS = 120_000


@pytest.fixture
def page(window: MainWindow, qtbot: Any) -> Iterator[ChatPage]:
    window.activateWindow()
    qtbot.waitExposed(window)
    chat = window.chat
    chat.max_tokens = 24
    window.show_page("Chat")
    qtbot.waitUntil(lambda: not chat.loading)  # the pickers and the history are read
    yield chat
    if chat.busy:  # never leave a generation running into the engine's close
        chat.stop()
        qtbot.waitUntil(lambda: not chat.busy, timeout=GENERATION_TIMEOUT_MS)


def wait_idle(qtbot: Any, page: ChatPage) -> None:
    """Until the answer is done and what it changed (the history) is read again."""
    qtbot.waitUntil(lambda: not page.busy and not page.loading, timeout=GENERATION_TIMEOUT_MS)


def open_chat(qtbot: Any, page: ChatPage, conversation_id: int) -> None:
    """Open a stored conversation and wait until it is shown."""
    with qtbot.waitSignal(page.conversation_opened, timeout=GENERATION_TIMEOUT_MS):
        page.open_conversation(conversation_id)


def reload_history(qtbot: Any, page: ChatPage) -> None:
    with qtbot.waitSignal(page.history.loaded, timeout=GENERATION_TIMEOUT_MS):
        page.history.reload()


def answers(page: ChatPage) -> list[MessageWidget]:
    return [m for m in page.transcript.messages() if m.role == "assistant"]


def stored_chat(window: MainWindow, question: str, answer: str, **extra: Any) -> tuple[int, int]:
    """A conversation written straight to the store: (conversation id, answer id)."""
    store = window.engine.conversations
    conversation = store.create(DEFAULT_MODEL)
    store.add_message(conversation.id, "user", question)
    message = store.add_message(conversation.id, "assistant", answer, model=DEFAULT_MODEL)
    if "citations" in extra:
        store.set_citations(message.id, extra["citations"])
    return conversation.id, message.id


# --- asking -----------------------------------------------------------------------------


def test_send_streams_the_answer_and_lists_the_conversation(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    assert page.model_id() == DEFAULT_MODEL
    page.composer.setPlainText("Name three colours.")
    qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    assert page.busy
    assert page.composer.toPlainText() == ""
    assert not page.send_button.isEnabled() and page.stop_button.isEnabled()
    wait_idle(qtbot, page)

    user, answer = page.transcript.messages()
    assert user.role == "user" and user.text() == "Name three colours."
    assert answer.text().strip()
    assert answer.batches >= 2  # it arrived in pieces while the model wrote it
    assert answer.message_id is not None
    assert "tokens" in answer.status_label.text()
    conversation, messages = window.engine.get_conversation(page.conversation_id or -1)
    assert messages[-1].id == answer.message_id
    assert messages[-1].content == answer.text()
    assert page.history.ids() == [conversation.id]
    item = page.history.conversation_list.item(0)
    assert item.text() == "Name three colours."
    assert page.history.current_id() == conversation.id
    assert page.send_button.isEnabled() and not page.stop_button.isEnabled()

    # The next question continues the same conversation.
    page.send("And one more?")
    wait_idle(qtbot, page)
    assert len(page.transcript.messages()) == 4
    assert window.engine.get_conversation(conversation.id)[0].message_count == 4
    assert page.history.ids() == [conversation.id]


def test_ctrl_enter_sends(qtbot: Any, window: MainWindow, page: ChatPage) -> None:
    qtbot.keyClicks(page.composer, "Hello there")
    qtbot.keyClick(page.composer, Qt.Key.Key_Return)  # a plain Enter is a new line
    assert not page.busy
    assert page.composer.toPlainText() == "Hello there\n"
    qtbot.keyClick(page.composer, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert page.busy
    wait_idle(qtbot, page)
    assert [m.role for m in page.transcript.messages()] == ["user", "assistant"]
    assert page.transcript.messages()[0].text() == "Hello there"
    assert len(window.engine.list_conversations()) == 1


def test_escape_stops_and_keeps_the_partial_answer(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    page.max_tokens = 400
    page.send("Write a long story about a lighthouse keeper and the sea.")
    answer = answers(page)[-1]
    qtbot.waitUntil(lambda: len(answer.text()) > 0, timeout=GENERATION_TIMEOUT_MS)
    qtbot.keyClick(page.composer, Qt.Key.Key_Escape)
    wait_idle(qtbot, page)

    assert answer.interrupted
    assert "interrupted" in answer.status_label.text()
    assert answer.text().strip()
    _, messages = window.engine.get_conversation(page.conversation_id or -1)
    stored = messages[-1]
    assert stored.id == answer.message_id
    assert stored.interrupted
    assert stored.content == answer.text()
    assert (stored.completion_tokens or 0) < 400
    # Reopened from the history, it is still marked.
    page.new_chat()
    open_chat(qtbot, page, stored.conversation_id)
    assert answers(page)[-1].interrupted
    assert "interrupted" in answers(page)[-1].status_label.text()


def test_event_loop_keeps_turning_while_the_model_generates(qtbot: Any, page: ChatPage) -> None:
    """About blocking, not speed: a 15 ms timer keeps firing all through an answer."""
    page.max_tokens = 48
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(15)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()) if page.busy else None)
    timer.start()
    try:
        page.send("Describe a sunny day at the beach.")
        wait_idle(qtbot, page)
    finally:
        timer.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    assert answers(page)[-1].text().strip()
    assert len(ticks) > 20, len(ticks)
    assert max(gaps) < 0.25, f"the GUI thread stalled for {max(gaps):.3f} s"


def test_regenerate_asks_the_last_question_again(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    page.send("Say hello.")
    wait_idle(qtbot, page)
    first = answers(page)[-1]
    assert first.regenerate_button.isVisibleTo(first)
    qtbot.mouseClick(first.regenerate_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, page)
    assert [m.text() for m in page.transcript.messages() if m.role == "user"] == ["Say hello."] * 2
    second = answers(page)[-1]
    assert second is not first
    assert second.regenerate_button.isVisibleTo(second)
    assert not first.regenerate_button.isVisibleTo(first)  # only the last answer offers it
    _, messages = window.engine.get_conversation(page.conversation_id or -1)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]


def test_an_engine_error_is_shown_and_the_question_kept(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    huge = "word " * 6000  # more than the default model's context window
    page.composer.setPlainText(huge)
    page.send()
    wait_idle(qtbot, page)
    assert window.notice.isVisible()
    assert "context window" in window.notice.label.text()
    assert page.transcript.messages() == []
    assert page.composer.toPlainText().strip() == huge.strip()
    assert window.engine.list_conversations() == []


# --- history ----------------------------------------------------------------------------


def test_rename_delete_and_search_conversations(
    qtbot: Any, window: MainWindow, page: ChatPage, monkeypatch: pytest.MonkeyPatch
) -> None:
    zebra, _ = stored_chat(window, "Tell me about zebras", "Zebras have stripes.")
    other, _ = stored_chat(window, "What is SQLite?", "An embedded database.")
    reload_history(qtbot, page)
    assert page.history.ids() == [other, zebra]

    # Opening a conversation shows its messages.
    with qtbot.waitSignal(page.conversation_opened):
        page.history.conversation_list.setCurrentRow(1)
    assert page.conversation_id == zebra
    assert [m.text() for m in page.transcript.messages()] == [
        "Tell me about zebras",
        "Zebras have stripes.",
    ]

    # Rename in place: what the editor commits is stored.
    page.history.rename_selected()
    item = page.history.conversation_list.currentItem()
    item.setText("Striped animals")
    qtbot.waitUntil(lambda: page.history.conversation_list.item(1).text() == "Striped animals")
    assert window.engine.get_conversation(zebra)[0].title == "Striped animals"

    # Ctrl+F goes to the search box; the engine's full-text search fills the list.
    qtbot.keyClick(page.composer, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    assert page.history.search_box.hasFocus()
    qtbot.keyClicks(page.history.search_box, "stripes")
    qtbot.waitUntil(lambda: page.history.ids() == [zebra] and not page.history.searching)
    assert "[stripes]" in page.history.conversation_list.item(0).text()
    page.history.search_box.clear()
    qtbot.waitUntil(lambda: page.history.ids() == [other, zebra])

    # Export writes Markdown or JSON by the file's suffix.
    out = Path(str(window.engine.home)) / "export.md"
    with qtbot.waitSignal(page.history.export_to(zebra, out).succeeded) as exported:
        pass
    assert exported.args == [out]
    assert out.read_text(encoding="utf-8").startswith("# Striped animals")
    assert f"Exported to {out}" in window.notice.label.text()
    # A file that cannot be written is said so, in plain words.
    with qtbot.waitSignal(page.history.export_to(zebra, out.parent / "no" / "x.md").failed):
        pass
    assert "Could not write" in window.notice.label.text()

    # Delete asks first (without blocking the window), then deletes for good.
    page.history.select(zebra)
    open_chat(qtbot, page, zebra)
    page.history.delete_selected()
    box = page.history.confirm_box
    assert box is not None and box.isVisible()
    qtbot.mouseClick(box.button(QMessageBox.StandardButton.Yes), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not page.history.busy)
    assert [c.id for c in window.engine.list_conversations()] == [other]
    assert page.history.ids() == [other]
    assert page.conversation_id is None and page.transcript.messages() == []


def test_ctrl_n_starts_a_new_chat(qtbot: Any, window: MainWindow, page: ChatPage) -> None:
    conversation_id, _ = stored_chat(window, "Old question", "Old answer")
    reload_history(qtbot, page)
    open_chat(qtbot, page, conversation_id)
    assert len(page.transcript.messages()) == 2
    page.history.conversation_list.setFocus()
    qtbot.keyClick(
        page.history.conversation_list, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier
    )
    assert page.conversation_id is None
    assert page.transcript.messages() == []
    assert page.history.current_id() is None
    assert page.composer.hasFocus()
    assert page.build_request("next").conversation_id is None
    # The main window's "chat with this model" goes through the same door.
    window.open_chat_with(DEFAULT_MODEL)
    qtbot.waitUntil(lambda: not page.loading)  # the models are read again first
    assert page.model_id() == DEFAULT_MODEL and page.conversation_id is None
    window.open_chat_with("no-such-model")
    qtbot.waitUntil(lambda: not page.loading)
    assert "no-such-model" in window.notice.label.text()


def test_no_question_is_sent_while_a_conversation_is_being_opened(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    conversation_id, _ = stored_chat(window, "Old question", "Old answer")
    with qtbot.waitSignal(page.conversation_opened, timeout=GENERATION_TIMEOUT_MS):
        page.open_conversation(conversation_id)
        # Read off the GUI thread: until it is shown, a question would land in the chat
        # shown before, so none is sent.
        assert not page.send("Too early")
        assert page.transcript.messages() == []
    assert page.conversation_id == conversation_id
    assert [m.text() for m in page.transcript.messages()] == ["Old question", "Old answer"]


def test_a_new_chat_started_while_one_is_opened_wins(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    conversation_id, _ = stored_chat(window, "Old question", "Old answer")
    page.open_conversation(conversation_id)
    page.new_chat()  # before the read came back
    qtbot.waitUntil(lambda: not page.loading)
    assert page.conversation_id is None and page.transcript.messages() == []


def test_tab_order_goes_from_the_pickers_to_the_question_and_send(
    qtbot: Any, page: ChatPage
) -> None:
    page.collection_picker.setFocus()
    qtbot.keyClick(page.collection_picker, Qt.Key.Key_Tab)
    assert page.composer.hasFocus()
    qtbot.keyClick(page.composer, Qt.Key.Key_Tab)  # Tab leaves the box instead of indenting
    assert page.send_button.hasFocus()
    assert page.composer.toPlainText() == ""
    page.history.search_box.setFocus()
    qtbot.keyClick(page.history.search_box, Qt.Key.Key_Tab)
    assert page.history.new_button.hasFocus()


# --- answers: ratings, Markdown, copy, citations ------------------------------------


def test_thumbs_up_and_down_are_stored_with_the_message(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    conversation_id, answer_id = stored_chat(window, "2 + 2?", "4")
    open_chat(qtbot, page, conversation_id)
    answer = answers(page)[-1]

    def stored_rating() -> int:
        return window.engine.get_conversation(conversation_id)[1][-1].rating

    def click(button: Any) -> None:
        """A click, then the write it starts (the buttons show what is stored)."""
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not page.loading)

    click(answer.up_button)
    assert stored_rating() == 1 and answer.up_button.isChecked()
    click(answer.down_button)
    assert stored_rating() == -1
    assert answer.down_button.isChecked() and not answer.up_button.isChecked()
    click(answer.down_button)  # a second click clears
    assert stored_rating() == 0 and not answer.down_button.isChecked()
    click(answer.up_button)
    page.new_chat()
    open_chat(qtbot, page, conversation_id)  # shown again from the database
    assert answers(page)[-1].up_button.isChecked()
    assert answers(page)[-1].message_id == answer_id


def test_markdown_and_code_blocks_render_and_copy_gives_the_source(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    source = "Use **this**:\n\n```python\nprint('hi')\nx = 1\n```\n\n- one\n- two\n"
    conversation_id, _ = stored_chat(window, "Code?", source)
    open_chat(qtbot, page, conversation_id)
    answer = answers(page)[-1]
    document = answer.view.document()
    assert "```" not in document.toPlainText() and "**" not in document.toPlainText()
    assert code_blocks(document) == ["print('hi')\nx = 1"]
    block = document.findBlock(document.toPlainText().index("print"))
    assert is_code_block(block)
    assert (
        block.blockFormat().background().color()
        != document.firstBlock().blockFormat().background().color()
    )
    answer.copy()
    assert QGuiApplication.clipboard().text() == source


def test_citation_chips_open_the_source(
    qtbot: Any, window: MainWindow, page: ChatPage, monkeypatch: pytest.MonkeyPatch
) -> None:
    cited = [
        {"n": 1, "path": "/docs/report.pdf", "page": 14, "snippet": "Revenue rose.", "score": 0.9,
         "line_start": None, "line_end": None},
        {"n": 2, "path": "/docs/notes.md", "page": None, "snippet": "See WAL.", "score": 0.5,
         "line_start": 10, "line_end": 24},
    ]  # fmt: skip
    conversation_id, _ = stored_chat(window, "Revenue?", "It rose [1], see [2].", citations=cited)
    open_chat(qtbot, page, conversation_id)
    chips = answers(page)[-1].chips
    assert chips is not None
    assert [b.text() for b in chips.buttons] == ["[1] report.pdf p.14", "[2] notes.md L10–24"]
    opened: list[tuple[object, Citation, object]] = []
    monkeypatch.setattr(
        chat_citations,
        "open_citation",
        lambda parent, c, engine: opened.append((parent, c, engine)),
    )
    chips.buttons[1].click()
    # A typed citation, and the engine handed over by the page (not found by the viewer).
    assert opened == [(page, Citation.from_public(cited[1]), page.engine)]


def test_citation_opens_the_viewer_module(
    window: MainWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    viewer = pytest.importorskip("desktop.viewer")  # written alongside this page
    shown: list[tuple[object, Citation, object]] = []
    monkeypatch.setattr(
        viewer, "show_source", lambda parent, c, engine: shown.append((parent, c, engine))
    )
    citation = Citation(1, "/docs/a.txt", score=1.0)
    chat_citations.open_citation(window, citation, window.engine)
    assert shown == [(window, citation, window.engine)]


# --- pickers ----------------------------------------------------------------------------


def test_pickers_list_models_and_collections(
    qtbot: Any, window: MainWindow, page: ChatPage
) -> None:
    assert [page.model_picker.itemData(i) for i in range(page.model_picker.count())] == [
        m.id for m in window.engine.list_models()
    ]
    window.engine.documents.create("handbook")
    page.refresh_collections()
    qtbot.waitUntil(lambda: not page.loading)
    items = [page.collection_picker.itemText(i) for i in range(page.collection_picker.count())]
    assert items == [NO_DOCUMENTS, "handbook"]
    assert page.build_request("q").collection is None
    page.collection_picker.setCurrentIndex(1)
    request = page.build_request("q")
    assert request.collection == "handbook"
    assert request.model_id == DEFAULT_MODEL
    assert request.sampling.max_tokens == page.max_tokens
    assert "handbook" in page.composer.placeholderText()
    # Shown again, the page keeps the choice.
    window.show_page("Models")
    window.show_page("Chat")
    qtbot.waitUntil(lambda: not page.loading)
    assert page.collection() == "handbook"


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_model_process_crash_ends_the_answer_and_the_app_goes_on(
    qtbot: Any, window: MainWindow, page: ChatPage, sig: signal.Signals
) -> None:
    page.max_tokens = 400
    page.send("Write a long story about a lighthouse keeper and the sea.")
    answer = answers(page)[-1]
    qtbot.waitUntil(lambda: len(answer.text()) > 0, timeout=GENERATION_TIMEOUT_MS)
    pid = window.engine.model_host_pid()
    assert pid is not None and pid != os.getpid()
    os.kill(pid, sig)
    wait_idle(qtbot, page)

    assert window.isVisible()
    assert window.notice.isVisible() and sig.name in window.notice.label.text()
    assert answer.interrupted and answer.text().strip()
    assert "model process ended" in answer.status_label.text()
    _, messages = window.engine.get_conversation(page.conversation_id or -1)
    assert messages[-1].interrupted and messages[-1].content.strip()
    assert page.history.current_id() == page.conversation_id

    page.max_tokens = 8
    page.send("Hi")  # a fresh model process answers
    wait_idle(qtbot, page)
    assert answers(page)[-1].text().strip() and not answers(page)[-1].interrupted
    assert window.engine.model_host_pid() not in (None, pid)
    assert len(page.transcript.messages()) == 4  # in the same conversation
