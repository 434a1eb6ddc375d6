"""The Fine-tune page on the real engine: preview, refusals, a real short run, cancel, resume.

Training tests run the real trainer child process (transformers + PEFT on the CPU); the
dequantized base is shared between them through ``BASTION_TRAIN_CACHE``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QColor, QTextDocument
from pytestqt.qtbot import QtBot

from desktop.app import MainWindow
from desktop.finetune.chart import LossChart
from desktop.finetune.settings import FIELDS, TrainingSettings
from desktop.pages.finetune import FinetunePage
from engine.train.spec import PRESETS, Hyper
from tests.conftest import DEFAULT_MODEL
from tests.train_facts import ANSWERS, QUESTIONS
from tests.train_facts import chat_line as _chat_line

# Generous: two cores shared with other work can make one step take half a minute.
TRAIN_TIMEOUT_MS = 900_000


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    path = tmp_path / "facts.jsonl"
    lines = [_chat_line(q, ANSWERS[i % 3]) for i, q in enumerate(QUESTIONS[:16])]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gui-train-cache")


@pytest.fixture
def page(window: MainWindow, qtbot: QtBot) -> FinetunePage:
    window.show_page("Fine-tune")
    assert window.stack.currentWidget() is window.finetune
    qtbot.waitUntil(lambda: not window.finetune.loading)  # the models and runs are read
    assert window.finetune.base.currentText() == DEFAULT_MODEL
    return window.finetune


def _preview(qtbot: QtBot, page: FinetunePage, path: Path) -> None:
    page.set_dataset(path)
    qtbot.waitUntil(lambda: page.preview_op is None, timeout=120_000)
    assert page.preview.result is not None, page.preview.summary.text()


def _short_run(page: FinetunePage, name: str, steps: int) -> None:
    page.name.setText(name)
    page.settings.set_value("max_steps", steps)
    page.settings.set_value("batch_size", 4)
    page.settings.set_value("save_every", 1)


# -- preview -------------------------------------------------------------------------------


def test_preview_lists_bad_lines_and_disables_start(
    qtbot: QtBot, page: FinetunePage, facts: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_chat_line("q?", "a.") + "\n{not json\n" + '{"messages": []}\n')
    _preview(qtbot, page, bad)
    table = page.preview.bad_lines
    assert table.isVisibleTo(page) and table.rowCount() == 2
    assert [table.item(r, 0).text() for r in range(2)] == ["2", "3"]
    assert table.item(0, 1).text()  # the engine's reason, word for word
    assert not page.start_button.isEnabled()
    assert "2 bad line(s)" in page.start_hint.text()

    _preview(qtbot, page, facts)  # a clean file: Start comes back
    assert not page.preview.bad_lines.isVisibleTo(page)
    assert "16 examples" in page.preview.summary.text()
    assert page.start_button.isEnabled(), page.start_hint.text()


def test_preview_shows_redaction_counts_and_a_before_after_sample(
    qtbot: QtBot, page: FinetunePage, tmp_path: Path
) -> None:
    data = tmp_path / "pii.jsonl"
    data.write_text(
        _chat_line("Write to alice@example.com about the invoice.", "Done.")
        + "\n"
        + _chat_line("Call me on +44 20 7946 0958 or mail bob@example.org.", "Will do.")
        + "\n"
        + _chat_line("What is the capital of France?", "Paris.")
        + "\n"
    )
    _preview(qtbot, page, data)
    assert "EMAIL 2" in page.preview.pii.text() and "PHONE 1" in page.preview.pii.text()
    assert "EMAIL 2" in page.preview.redaction.text()
    sample = page.preview.sample
    assert sample.isVisibleTo(page) and sample.rowCount() == 2
    assert "alice@example.com" in sample.item(0, 1).text()
    assert "<EMAIL>" in sample.item(0, 2).text()
    assert "alice@example.com" not in sample.item(0, 2).text()
    # The dry run's files (which hold the removed personal data) are gone again.
    result = page.preview.result
    assert result is not None and result.prepared is not None
    assert not result.prepared.report_path.exists()
    assert page.start_button.isEnabled()


# -- settings and chart --------------------------------------------------------------------


def test_settings_cover_every_hyperparameter_and_follow_presets(qtbot: QtBot) -> None:
    form = TrainingSettings()
    qtbot.addWidget(form)
    assert set(FIELDS) == {f.name for f in fields(Hyper)}
    assert form.hyper() == PRESETS["balanced"]
    form.preset.setCurrentText("quick")
    assert form.hyper() == PRESETS["quick"]
    form.set_value("rank", 4)  # alpha follows as 2 x rank, like --rank on the CLI
    form.set_value("max_steps", 7)
    hyper = form.hyper()
    assert (hyper.rank, hyper.alpha, hyper.max_steps, hyper.save_every) == (4, 8.0, 7, None)
    assert form.redact.isChecked() and form.backend.currentText() == "auto"


def test_chart_draws_the_loss_line(qtbot: QtBot) -> None:
    chart = LossChart()
    qtbot.addWidget(chart)
    chart.resize(400, 240)
    chart.set_total(10)
    for step, loss in enumerate([2.5, 2.1, 1.7, 1.6], start=1):
        chart.add_point(step, loss)
    chart.add_point(5, float("nan"))  # never drawn
    assert [s for s, _ in chart.points] == [1, 2, 3, 4]
    image = chart.grab().toImage()
    line = QColor("#1f77b4")
    found = any(
        image.pixelColor(x, y) == line
        for x in range(0, image.width(), 2)
        for y in range(0, image.height(), 2)
    )
    assert found


# -- training ------------------------------------------------------------------------------


def test_refused_start_shows_the_engine_message(
    qtbot: QtBot, window: MainWindow, page: FinetunePage, facts: Path
) -> None:
    _preview(qtbot, page, facts)
    page.name.setText(DEFAULT_MODEL)
    qtbot.mouseClick(page.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.training_op is None, timeout=60_000)
    assert "exists already" in window.notice.label.text()
    assert window.notice.isVisible()
    assert page.start_button.isEnabled()
    assert window.engine.training.list_runs() == []


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_short_finetune_moves_the_chart_then_reports_and_opens_chat(
    qtbot: QtBot,
    window: MainWindow,
    page: FinetunePage,
    facts: Path,
    train_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BASTION_TRAIN_CACHE", str(train_cache))
    _preview(qtbot, page, facts)
    _short_run(page, "facty-gui", 3)
    qtbot.mouseClick(page.start_button, Qt.MouseButton.LeftButton)
    assert page.training_op is not None and not page.start_button.isEnabled()
    assert page.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: len(page.chart.points) >= 1, timeout=TRAIN_TIMEOUT_MS)
    assert page.chart.total_steps == 3
    qtbot.waitUntil(lambda: page.training_op is None, timeout=TRAIN_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not page.loading)  # the run's losses and the runs, read again

    result = page.results.result
    assert result is not None, page.monitor.status.text()
    assert result.model == "facty-gui" and result.steps == 3
    assert page.tabs.currentWidget() is page.results
    assert "→" in page.results.numbers.text() and "tokens/s" in page.results.numbers.text()
    assert "Fine-tune facty-gui" in page.results.report.toPlainText()
    svg = page.results.report.document().resource(
        QTextDocument.ResourceType.ImageResource, QUrl("loss.svg")
    )
    assert svg is not None  # loss.svg was found next to report.md and loaded
    assert page.chart.validation_points  # before and after, from the result
    assert page.monitor.log.toPlainText().strip()
    run = page.runs.selected_run()
    assert run is not None and (run.name, run.status) == ("facty-gui", "done")

    qtbot.mouseClick(page.results.chat_button, Qt.MouseButton.LeftButton)
    assert window.stack.currentWidget() is window.chat


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cancel_mid_run_then_resume_finishes(
    qtbot: QtBot,
    window: MainWindow,
    page: FinetunePage,
    facts: Path,
    train_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BASTION_TRAIN_CACHE", str(train_cache))
    _preview(qtbot, page, facts)
    _short_run(page, "stoppy", 6)
    # No validation split: no loss measured before and after and no side-by-side answers,
    # which leaves the training steps themselves, the part that is stopped and resumed.
    page.settings.val_fraction.setValue(0.0)
    qtbot.mouseClick(page.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(page.chart.points) >= 1, timeout=TRAIN_TIMEOUT_MS)
    qtbot.mouseClick(page.cancel_button, Qt.MouseButton.LeftButton)
    assert not page.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: page.training_op is None, timeout=TRAIN_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not page.loading)  # the stopped run's record, read back

    assert page.results.result is None
    assert "stopped at step" in page.monitor.status.text().lower()
    assert "resume continues" in page.monitor.status.text().lower()
    record = window.engine.training.runs.get("stoppy")
    assert record is not None and record.status == "stopped"
    assert 1 <= record.step < 6
    selected = page.runs.selected_run()
    assert selected is not None and selected.name == "stoppy"
    assert page.resume_button.isEnabled()

    qtbot.mouseClick(page.resume_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not page.loading)  # long before the trainer's first step
    assert page.chart.points  # the steps before the stop, read back from the run
    qtbot.waitUntil(lambda: page.training_op is None, timeout=TRAIN_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not page.loading)  # the run's losses, read again at its end
    result = page.results.result
    assert result is not None, page.monitor.status.text()
    assert result.model == "stoppy" and result.steps == 6
    assert max(step for step, _ in page.chart.points) == 6
    record = window.engine.training.runs.get("stoppy")
    assert record is not None and record.status == "done"
