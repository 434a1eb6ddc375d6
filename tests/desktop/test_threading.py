"""The GUI's threading rule (desktop/ops.py), checked: no page calls the engine on the GUI
thread, neither while it is built nor in its normal actions.

The window runs on a stand-in for the real engine that records the thread of every call
made through it -- on the facade, and on the services reached from it
(``engine.documents``, ``engine.training``). Pages import nothing of the engine but its
public names (tests/test_layering.py), so every call they make goes through the spy. The
one call allowed on the GUI thread is a subscription to the settings' change
notification: it registers a callback and reads nothing.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QMessageBox
from pytestqt.qtbot import QtBot

from desktop import ops
from desktop.app import MainWindow
from tests.conftest import DEFAULT_MODEL, write_gguf
from tests.train_facts import ANSWERS, QUESTIONS, chat_line

WAIT_MS = 120_000
# Registers a callback; reads and writes nothing (see desktop/ops.py).
ALLOWED_ON_GUI = {"engine.on_settings_changed"}
Calls = list[tuple[str, threading.Thread]]


class EngineSpy:
    """Stands in for an engine object: records ``(name, thread)`` for every call made
    through it, and wraps the engine's services it hands out the same way."""

    def __init__(self, target: Any, calls: Calls, path: str = "engine") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        path = f"{self._path}.{name}"
        if callable(value) and not isinstance(value, type):
            return _recorded(value, path, self._calls)
        if _is_service(value):
            return EngineSpy(value, self._calls, path)
        return value  # a plain attribute fixed at start (``home``)


def _is_service(value: object) -> bool:
    module = type(value).__module__
    return module.startswith("engine.") and not is_dataclass(value)


def _recorded(fn: Callable[..., Any], name: str, calls: Calls) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, threading.current_thread()))
        return fn(*args, **kwargs)

    return call


@pytest.fixture
def calls() -> Calls:
    return []


@pytest.fixture
def window(home: Path, qtbot: QtBot, calls: Calls) -> Iterator[MainWindow]:
    """The main window on a recording stand-in for a real engine (replaces conftest's)."""
    from engine import Engine

    engine = Engine(home, embedder_export_in_child=True)
    win = MainWindow(EngineSpy(engine, calls))  # type: ignore[arg-type]
    qtbot.addWidget(win)
    win.show()
    yield win
    qtbot.waitUntil(lambda: not ops.running(win), timeout=WAIT_MS)
    win.close()
    engine.close()


def _settle(qtbot: QtBot, win: MainWindow) -> None:
    qtbot.waitUntil(lambda: not ops.running(win), timeout=WAIT_MS)


def _check(calls: Calls, expected: set[str]) -> None:
    """No call on the GUI thread, and ``expected`` among the calls (made elsewhere)."""
    on_gui = sorted(
        {
            name
            for name, thread in calls
            if thread is threading.main_thread() and name not in ALLOWED_ON_GUI
        }
    )
    assert on_gui == [], f"called on the GUI thread: {on_gui}"
    made = {name for name, _ in calls}
    assert expected <= made, f"never called: {sorted(expected - made)}"


def test_building_the_window_calls_nothing_on_the_gui_thread(
    window: MainWindow, qtbot: QtBot, calls: Calls
) -> None:
    _settle(qtbot, window)
    _check(
        calls,
        {
            "engine.list_models",
            "engine.default_model_id",
            "engine.documents.all",
            "engine.list_conversations",
            "engine.training.list_runs",
            "engine.get_settings",
            "engine.privacy_status",
        },
    )
    assert window.chat.model_id() == DEFAULT_MODEL  # filled when the read came back
    assert window.finetune.base.currentText() == DEFAULT_MODEL
    assert window.models.table.rowCount() >= 1


def test_chat_and_history_actions_stay_off_the_gui_thread(
    window: MainWindow, qtbot: QtBot, calls: Calls, tmp_path: Path
) -> None:
    page = window.chat
    page.max_tokens = 4
    _settle(qtbot, window)
    assert page.send("Say hi.")
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)
    _settle(qtbot, window)
    conversation_id = page.conversation_id
    assert conversation_id is not None and page.history.ids() == [conversation_id]

    page.new_chat()
    with qtbot.waitSignal(page.conversation_opened, timeout=WAIT_MS):
        page.history.conversation_list.setCurrentRow(0)  # as a click does
    answer = [m for m in page.transcript.messages() if m.role == "assistant"][-1]
    qtbot.mouseClick(answer.up_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(answer.up_button.isChecked, timeout=WAIT_MS)
    page.history.rename_selected()
    page.history.conversation_list.currentItem().setText("Greetings")
    qtbot.waitUntil(
        lambda: page.history.conversation_list.item(0).text() == "Greetings", timeout=WAIT_MS
    )
    page.history.search_box.setText("Say")  # a word of the conversation's message
    # The search starts after a typing pause: wait for the call itself and its hit, not
    # only for a list that showed "Greetings" before the search began (CI caught that race).
    qtbot.waitUntil(
        lambda: (
            any(name == "engine.search_history" for name, _ in calls)
            and not page.history.searching
            and (item := page.history.conversation_list.item(0)) is not None
            and "Greetings" in item.text()
        ),
        timeout=WAIT_MS,
    )
    with qtbot.waitSignal(page.history.export_to(conversation_id, tmp_path / "c.md").finished):
        pass
    page.history.search_box.clear()
    page.history.delete(conversation_id)
    qtbot.waitUntil(lambda: page.history.ids() == [], timeout=WAIT_MS)
    _settle(qtbot, window)
    _check(
        calls,
        {
            "engine.chat",
            "engine.get_conversation",
            "engine.rate_message",
            "engine.rename_conversation",
            "engine.search_history",
            "engine.export_conversation",
            "engine.delete_conversation",
        },
    )


@pytest.mark.usefixtures("shared_embedder")
def test_documents_actions_stay_off_the_gui_thread(
    window: MainWindow, qtbot: QtBot, calls: Calls, tmp_path: Path
) -> None:
    page = window.documents
    window.show_page("Documents")
    page.create_collection("notes")
    qtbot.waitUntil(lambda: page.selected == "notes" and not page.busy, timeout=WAIT_MS)
    note = tmp_path / "note.md"
    note.write_text("# Lighthouse\n\nThe keeper lit the lamp at dusk.\n")
    with qtbot.waitSignal(page.indexing_finished, timeout=WAIT_MS):
        page.add_paths([str(note)])
    with qtbot.waitSignal(page.indexing_finished, timeout=WAIT_MS):
        page.sync()
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)
    from desktop.viewer import SourceViewer, show_source
    from engine import Citation

    show_source(page, Citation(0, str(note)), page.engine)
    viewers = window.findChildren(SourceViewer)
    assert len(viewers) == 1
    viewer = viewers[0]
    qtbot.waitUntil(lambda: not viewer.loading, timeout=WAIT_MS)
    assert "keeper" in viewer.text.toPlainText()
    page.remove_collection("notes")
    qtbot.waitUntil(lambda: page.collection_list.count() == 0 and not page.busy, timeout=WAIT_MS)
    _settle(qtbot, window)
    _check(
        calls,
        {
            "engine.documents.create",
            "engine.documents.all",
            "engine.documents.status",
            "engine.documents.add",
            "engine.documents.sync",
            "engine.documents.source_text",
            "engine.documents.remove",
        },
    )


def test_models_actions_stay_off_the_gui_thread(
    window: MainWindow,
    qtbot: QtBot,
    calls: Calls,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = window.models
    window.show_page("Models")
    qtbot.waitUntil(lambda: page.hardware is not None and not page.busy, timeout=WAIT_MS)
    page.select_model(DEFAULT_MODEL)
    page.threads.setValue(1)
    qtbot.mouseClick(page.save_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)
    path = write_gguf(tmp_path / "Spare.F32.gguf")
    with qtbot.waitSignal(page.import_files([path]).finished, timeout=WAIT_MS):  # type: ignore[union-attr]
        pass
    qtbot.waitUntil(lambda: page.selected_id() == "spare.f32" and not page.busy, timeout=WAIT_MS)
    monkeypatch.setattr(QMessageBox, "question", lambda *a: QMessageBox.StandardButton.Yes)
    page.remove_selected()
    qtbot.waitUntil(lambda: page.table.rowCount() == 1 and not page.busy, timeout=WAIT_MS)
    _settle(qtbot, window)
    _check(
        calls,
        {
            "engine.list_models",
            "engine.model_info",
            "engine.set_model_settings",
            "engine.import_model",
            "engine.remove_model",
            "engine.detect_hardware",
        },
    )


def test_finetune_page_stays_off_the_gui_thread(
    window: MainWindow, qtbot: QtBot, calls: Calls, tmp_path: Path
) -> None:
    page = window.finetune
    window.show_page("Fine-tune")
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(chat_line(q, ANSWERS[i % 3]) for i, q in enumerate(QUESTIONS[:4])))
    page.set_dataset(data)
    qtbot.waitUntil(lambda: page.preview_op is None, timeout=WAIT_MS)
    page.name.setText(DEFAULT_MODEL)  # taken: the engine refuses the start, on its thread
    page.start()
    qtbot.waitUntil(lambda: page.training_op is None and not page.loading, timeout=WAIT_MS)
    _settle(qtbot, window)
    _check(
        calls,
        {
            "engine.list_models",
            "engine.training.list_runs",
            "engine.training.preview_dataset",
            "engine.training.finetune",
        },
    )


def test_settings_page_stays_off_the_gui_thread(
    window: MainWindow, qtbot: QtBot, calls: Calls
) -> None:
    page = window.settings
    window.show_page("Settings")
    qtbot.waitUntil(lambda: page.sizes is not None and not page.busy, timeout=WAIT_MS)
    page.audit_box.click()
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)
    try:
        page.theme_combo.setCurrentIndex(page.theme_combo.findData("light"))
        qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)
    finally:  # the appearance is application-wide: hand it back to the system
        QGuiApplication.styleHints().setColorScheme(Qt.ColorScheme.Unknown)
    page.refresh_guard()
    _settle(qtbot, window)
    _check(
        calls,
        {
            "engine.get_settings",
            "engine.update_settings",
            "engine.privacy_status",
            "engine.storage_usage",
        },
    )
