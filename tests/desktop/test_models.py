"""The models page on a real engine, offscreen: table, import, drop, settings, hardware."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from desktop.app import MainWindow
from desktop.pages.models import COLUMNS, ModelsPage, human_size
from engine.errors import InvalidModelFile
from engine.models.registry import ModelSettings
from tests.conftest import DEFAULT_MODEL, write_gguf
from tests.fake_hub import REPO

WAIT_MS = 60_000


@pytest.fixture
def page(window: MainWindow, qtbot: object) -> ModelsPage:
    """The models page, not shown: its hardware probes start only when it is. Its table
    is filled when the registry's list comes back (read off the GUI thread).

    Tests that start background work wait for it to end: pytest-qt deletes the window
    before fixtures are torn down, and an operation must not outlive its page.
    """
    settle(qtbot, window.models)
    return window.models


def settle(qtbot: object, page: ModelsPage) -> None:
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]


def rows(page: ModelsPage) -> dict[str, list[str]]:
    table = page.table
    out = {}
    for r in range(table.rowCount()):
        cells = [table.item(r, c).text() for c in range(table.columnCount())]
        out[cells[0]] = cells
    return out


def cell(row: list[str], column: str) -> str:
    return row[COLUMNS.index(column)]


def wait_import(qtbot: object, page: ModelsPage, paths: list[Path]) -> None:
    op = page.import_files(paths)
    assert op is not None
    # The result reaches the GUI thread queued, so waiting after the start misses nothing.
    with qtbot.waitSignal(op.finished, timeout=WAIT_MS):  # type: ignore[attr-defined]
        pass
    settle(qtbot, page)  # the table is read again after an import


def test_table_lists_the_default_model_with_its_facts(page: ModelsPage) -> None:
    entry = page.engine.models.get(DEFAULT_MODEL)
    row = rows(page)[DEFAULT_MODEL]
    assert cell(row, "Architecture") == "llama"
    assert cell(row, "Quantization") == "Q4_1"
    assert cell(row, "Size") == human_size(entry.size_bytes) and "MB" in cell(row, "Size")
    assert cell(row, "Context") == str(entry.context_length) and entry.context_length
    assert cell(row, "Parameters").endswith("M")
    assert cell(row, "Kind") == "built-in"
    assert page.selected_id() == DEFAULT_MODEL
    assert not page.remove_button.isEnabled()  # a built-in model would come back


def test_importing_a_valid_copy_adds_a_row(
    window: MainWindow, page: ModelsPage, qtbot: object, model_copy: Path
) -> None:
    before = set(rows(page))
    wait_import(qtbot, page, [model_copy])
    added = set(rows(page)) - before
    assert added == {"smollm2-copy.q4_1"}
    assert page.engine.models.get("smollm2-copy.q4_1").path == str(model_copy)
    assert page.selected_id() == "smollm2-copy.q4_1"
    assert "Imported smollm2-copy.q4_1" in window.notice.label.text()
    assert page.import_button.isEnabled()


def _garbage(tmp_path: Path, model_copy: Path) -> Path:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"this is not a model at all\n" * 100)
    return path


def _truncated(tmp_path: Path, model_copy: Path) -> Path:
    with model_copy.open("r+b") as fh:
        fh.truncate(1_000_000)
    return model_copy


@pytest.mark.parametrize("damage", [_garbage, _truncated], ids=["garbage", "truncated"])
def test_a_corrupt_file_is_refused_in_plain_words(
    window: MainWindow,
    page: ModelsPage,
    qtbot: object,
    tmp_path: Path,
    model_copy: Path,
    damage: object,
) -> None:
    bad = damage(tmp_path, model_copy)  # type: ignore[operator]
    with pytest.raises(InvalidModelFile) as refusal:
        page.engine.import_model(bad)
    before = rows(page)
    wait_import(qtbot, page, [bad])
    assert rows(page) == before
    notice = window.notice.label.text()
    assert window.notice.isVisible()
    assert notice == f"{bad.name} was not imported: {refusal.value}"
    assert "Traceback" not in notice and "went wrong" not in notice


def drag_enter(mime: QMimeData) -> QDragEnterEvent:
    """A drag entering the page. Its only constructor takes a QPoint, which PySide marks
    deprecated (Qt's other events moved to QPointF); the warning is noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return QDragEnterEvent(
            QPoint(20, 20),
            Qt.DropAction.CopyAction,
            mime,
            Qt.MouseButton.LeftButton,
            Qt.KeyboardModifier.NoModifier,
        )


def test_dropping_files_imports_them_and_reports_each(
    window: MainWindow, page: ModelsPage, qtbot: object, tmp_path: Path
) -> None:
    good = write_gguf(tmp_path / "Dropped-Model.F32.gguf")
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(good)), QUrl.fromLocalFile(str(bad))])
    assert page.acceptDrops()  # else Qt would never offer the page a drop
    enter = drag_enter(mime)
    QApplication.sendEvent(page, enter)
    assert enter.isAccepted()
    drop = QDropEvent(
        QPointF(20, 20),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    QApplication.sendEvent(page, drop)
    assert drop.isAccepted()
    qtbot.waitUntil(lambda: "dropped-model.f32" in rows(page), timeout=WAIT_MS)  # type: ignore[attr-defined]
    settle(qtbot, page)
    notice = window.notice.label.text()
    assert "notes.gguf was not imported" in notice and "not a GGUF model" in notice
    assert "Imported dropped-model.f32" in notice
    assert "notes" not in rows(page)


def test_a_drag_without_files_is_not_accepted(page: ModelsPage) -> None:
    mime = QMimeData()
    mime.setText("just text")
    enter = drag_enter(mime)
    enter.ignore()
    page.dragEnterEvent(enter)
    assert not enter.isAccepted()


def test_editing_load_settings_persists(page: ModelsPage, qtbot: object) -> None:
    page.select_model(DEFAULT_MODEL)
    page.gpu_layers.setValue(0)
    page.context.setValue(1024)
    page.threads.setValue(1)
    qtbot.mouseClick(page.save_button, Qt.MouseButton.LeftButton)  # type: ignore[attr-defined]
    settle(qtbot, page)  # saved, and the table read again
    saved = page.engine.models.get(DEFAULT_MODEL).settings
    assert saved == ModelSettings(gpu_layers=0, context=1024, threads=1)
    assert page.context.text() == "1024"

    # Typing "auto" (or stepping to it) hands the choice back to Bastion; -1 reads "all".
    page.context.lineEdit().setText("auto")
    page.context.interpretText()
    page.gpu_layers.setValue(-1)
    assert page.gpu_layers.text() == "all"
    page.threads.setValue(page.threads.minimum())
    assert page.threads.text() == "auto"
    qtbot.mouseClick(page.save_button, Qt.MouseButton.LeftButton)  # type: ignore[attr-defined]
    settle(qtbot, page)
    saved = page.engine.models.get(DEFAULT_MODEL).settings
    assert saved == ModelSettings(gpu_layers=-1, context=None, threads=None)


def test_removing_a_model_asks_first_and_keeps_the_file(
    window: MainWindow,
    page: ModelsPage,
    qtbot: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_gguf(tmp_path / "Removable.F32.gguf")
    wait_import(qtbot, page, [path])
    page.select_model("removable.f32")
    assert page.remove_button.isEnabled()

    answers = [QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes]
    asked: list[str] = []

    def question(parent: object, title: str, text: str, *args: object) -> object:
        asked.append(text)
        return answers.pop(0)

    monkeypatch.setattr(QMessageBox, "question", question)
    page.remove_selected()
    assert not page.busy  # answered No: nothing was started
    assert "removable.f32" in rows(page)
    page.remove_selected()
    settle(qtbot, page)  # removed, and the table read again
    assert "removable.f32" not in rows(page)
    assert [m.id for m in page.engine.list_models()] == [DEFAULT_MODEL]
    assert path.exists() and "is not deleted" in asked[0]
    assert "Removed removable.f32" in window.notice.label.text()


def test_hardware_panel_shows_cpu_ram_and_the_fit(
    window: MainWindow, page: ModelsPage, qtbot: object
) -> None:
    assert page.hardware is None and not page.busy  # nothing probed before it is shown
    window.show_page("Models")
    qtbot.waitUntil(lambda: page.hardware is not None, timeout=WAIT_MS)  # type: ignore[attr-defined]
    hw = page.hardware
    assert hw is not None
    text = page.hardware_label.text()
    assert f"CPU: {hw.cpu}" in text and f"{hw.physical_cores} cores" in text
    assert f"RAM: {human_size(hw.ram_total_bytes)}" in text
    assert "GPU:" in text
    page.select_model(DEFAULT_MODEL)
    qtbot.waitUntil(lambda: "free memory" in page.fit.text(), timeout=WAIT_MS)  # type: ignore[attr-defined]
    assert "fit" in page.fit.text() and "runs on" in page.fit.text()
    settle(qtbot, page)


def test_hub_search_and_download_from_the_page(
    page: ModelsPage, qtbot: object, fake_hub: object
) -> None:
    hub = page.hub
    hub.query.setText("tiny")
    hub.search()
    qtbot.waitUntil(lambda: hub.results.topLevelItemCount() == 1, timeout=WAIT_MS)  # type: ignore[attr-defined]
    repo = hub.results.topLevelItem(0)
    assert REPO in repo.text(0) and "apache-2.0" in repo.text(0)
    files = {repo.child(i).text(0): repo.child(i) for i in range(repo.childCount())}
    assert set(files) == {"tiny-test.F32.gguf", "tiny-test.Q4_K_M.gguf"}
    assert files["tiny-test.Q4_K_M.gguf"].text(1) == "Q4_K_M"
    hub.results.setCurrentItem(files["tiny-test.F32.gguf"])
    assert hub.download_button.isEnabled()
    hub.start_download()
    assert hub.cancel_button.isVisibleTo(hub)
    qtbot.waitUntil(lambda: hub.download is None, timeout=WAIT_MS)  # type: ignore[attr-defined]
    settle(qtbot, page)
    assert "Downloaded and registered tiny-test.f32" in hub.status.text()
    assert "tiny-test.f32" in rows(page)
    assert page.selected_id() == "tiny-test.f32"
