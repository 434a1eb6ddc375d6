"""Evaluate and improve in the desktop: blind A/B, corrections in chat, feedback as data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QInputDialog

from tests.conftest import DEFAULT_MODEL

WAIT_MS = 180_000


def test_blind_pick_then_names_and_win_rates(
    window: Any, qtbot: Any, model_copy: Path, tmp_path: Path
) -> None:
    window.engine.import_model(model_copy, "other")
    window.show_page("Compare")
    page = window.compare
    page.model_list.refresh()
    qtbot.waitUntil(lambda: page.model_b.count() == 2, timeout=WAIT_MS)
    page.model_a.setCurrentText(DEFAULT_MODEL)
    page.model_b.setCurrentText("other")
    assert not page.first_button.isEnabled()  # nothing to pick yet
    page.prompt.setPlainText("Name a colour.")
    qtbot.mouseClick(page.ask_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(page.first_button.isEnabled, timeout=WAIT_MS)
    # Unlabelled until the pick: no model name anywhere on the answers.
    assert [box.title() for box in page.titles] == ["Answer 1", "Answer 2"]
    assert page.views[0].toPlainText().strip() and page.views[1].toPlainText().strip()
    window.grab().save(str(tmp_path / "compare-before-pick.png"))
    shown_first = page.pair.first_model
    qtbot.mouseClick(page.first_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: ":" in page.titles[0].title(), timeout=WAIT_MS)
    assert page.titles[0].title() == f"Answer 1: {shown_first}"
    assert not page.first_button.isEnabled()  # one pick per pair
    qtbot.waitUntil(lambda: page.rates.topLevelItemCount() == 2, timeout=WAIT_MS)
    top = page.rates.topLevelItem(0)
    assert top.text(0) == shown_first and top.text(2) == "1"
    window.grab().save(str(tmp_path / "compare-after-pick.png"))
    best = window.engine.win_rates()[0]
    assert (best.model, best.wins) == (shown_first, 1)

    window.show_page("Models")
    models = window.models
    models.refresh()
    qtbot.waitUntil(lambda: not models.busy, timeout=WAIT_MS)
    column = [
        models.table.horizontalHeaderItem(c).text() for c in range(models.table.columnCount())
    ]
    rate = column.index("A/B win rate")
    cells = {
        models.table.item(r, 0).text(): models.table.item(r, rate).text()
        for r in range(models.table.rowCount())
    }
    assert cells[shown_first].startswith("100% (") and cells[shown_first].endswith("of 1")


def test_correct_an_answer_then_train_on_feedback(
    window: Any, qtbot: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = window.engine
    conversation = engine.conversations.create(DEFAULT_MODEL)
    engine.conversations.add_message(conversation.id, "user", "What is 2+2?")
    answer_id = engine.conversations.add_message(
        conversation.id, "assistant", "5", model=DEFAULT_MODEL
    ).id
    window.show_page("Chat")
    chat = window.chat
    with qtbot.waitSignal(chat.conversation_opened, timeout=WAIT_MS):
        chat.open_conversation(conversation.id)
    answer = next(m for m in chat.transcript.messages() if m.role == "assistant")
    assert answer.correct_button.text() == "Correct…"
    offered: list[str] = []

    def dialog(*args: Any) -> tuple[str, bool]:  # the user edits the offered text
        offered.append(args[3])
        return "2+2 is 4.", True

    monkeypatch.setattr(QInputDialog, "getMultiLineText", dialog)
    with qtbot.waitSignal(answer.correct_requested, timeout=WAIT_MS) as asked:
        answer.correct_button.click()
    assert asked.args == [answer_id] and offered == ["5"]
    qtbot.waitUntil(lambda: answer.correction == "2+2 is 4.", timeout=WAIT_MS)
    assert answer.correction_label.isVisible() and "2+2 is 4." in answer.correction_label.text()
    assert answer.correct_button.text() == "Edit correction…"
    window.grab().save(str(tmp_path / "chat-corrected.png"))
    stored = engine.get_conversation(conversation.id)[1][1]
    assert (stored.content, stored.correction) == ("5", "2+2 is 4.")

    window.show_page("Fine-tune")
    page = window.finetune
    qtbot.waitUntil(lambda: not page.loading, timeout=WAIT_MS)
    assert page.continue_from.currentText().startswith("(a new adapter")
    qtbot.mouseClick(page.feedback_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.dataset.text().endswith(".jsonl"), timeout=WAIT_MS)
    made = Path(page.dataset.text())
    assert made.parent == engine.home / "feedback"
    line = json.loads(made.read_text())
    assert line["messages"][-1]["content"] == "2+2 is 4."
    qtbot.waitUntil(lambda: page.preview_op is None, timeout=WAIT_MS)
    assert page.preview.result is not None and page.preview.result.check.examples == 1
    window.grab().save(str(tmp_path / "finetune-feedback.png"))
