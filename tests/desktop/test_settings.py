"""The settings page on a real engine, offscreen: home, sizes, guard, audit, appearance."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from desktop.app import MainWindow
from desktop.pages.settings import SettingsPage, guard_text
from engine import STORAGE_AREAS as AREAS
from engine import ChatRequest, SamplingParams, human_size
from engine.config import load_config
from engine.privacy import guard
from engine.privacy.audit import audit_log_path
from engine.status import privacy_status, tree_size

WAIT_MS = 60_000
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture
def page(window: MainWindow, qtbot: object) -> Iterator[SettingsPage]:
    # The settings and the guard's status are read off the GUI thread: wait for them.
    qtbot.waitUntil(lambda: not window.settings.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
    yield window.settings
    # The appearance is application-wide: hand it back to the system for the next test.
    # (Not through the page: pytest-qt may have deleted the window by now.)
    QGuiApplication.styleHints().setColorScheme(Qt.ColorScheme.Unknown)


def test_shows_the_home_and_what_is_stored(page: SettingsPage) -> None:
    assert page.audit_box.isEnabled() and page.theme_combo.isEnabled()  # settings were read
    assert page.home_label.text() == str(page.engine.home)
    assert page.open_button.isEnabled()
    statement = page.privacy_label.text()
    for needle in (
        "Nothing leaves this machine",
        "bastion.db",
        "models/",
        "logs/",
        "keyring",
        "cache/",
    ):
        assert needle in statement


def test_folder_sizes_are_counted_when_the_page_is_shown(
    window: MainWindow, page: SettingsPage, qtbot: object
) -> None:
    assert page.sizes is None and not page.busy  # nothing counted while hidden
    (page.engine.home / "adapters" / "a.bin").write_bytes(b"x" * 5000)
    window.show_page("Settings")
    qtbot.waitUntil(lambda: page.sizes is not None and not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
    sizes = page.sizes
    assert sizes is not None and set(sizes) == set(AREAS)
    assert sizes["Fine-tuned adapters"] == 5000
    database = next(area for area in AREAS if area.startswith("Database"))
    assert sizes[database] >= (page.engine.home / "bastion.db").stat().st_size > 0
    assert page.size_labels[database].text() == human_size(sizes[database])
    assert page.size_labels["Total"].text() == human_size(sum(sizes.values()))


def test_tree_size_counts_files_below_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"1" * 10)
    (tmp_path / "a" / "b" / "two").write_bytes(b"2" * 32)
    assert tree_size(tmp_path / "a") == 42
    assert tree_size(tmp_path / "a" / "one") == 10
    assert tree_size(tmp_path / "missing") == 0


def test_shows_the_guard_status(page: SettingsPage) -> None:
    text = page.guard_label.text()
    assert guard.is_active()  # the engine turned it on at start
    assert "Guard: active" in text
    assert f"all {len(guard.OFFLINE_SWITCHES)} set" in text
    assert f"all {len(guard.TELEMETRY_SWITCHES)} off" in text


def test_guard_text_names_a_switch_that_was_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    status = privacy_status(False, Path("audit.jsonl"))
    assert "Offline switches NOT set: HF_HUB_OFFLINE" in guard_text(status)


def test_the_audit_help_names_the_file_once_read(page: SettingsPage) -> None:
    assert str(audit_log_path(page.engine.home)) in page.audit_help.text()


def test_a_setting_changed_elsewhere_shows_on_the_page(page: SettingsPage, qtbot: object) -> None:
    # Another client of the engine (a CLI call, the server) changes a setting: the page
    # hears the engine's one notification and shows it, without a click here.
    import threading

    worker = threading.Thread(target=lambda: page.engine.update_settings(audit_log=True))
    worker.start()
    worker.join()
    qtbot.waitUntil(page.audit_box.isChecked, timeout=WAIT_MS)  # type: ignore[attr-defined]
    assert page.config is not None and page.config.audit_log


def test_audit_switch_writes_config_and_records_chats_only_while_on(
    window: MainWindow, page: SettingsPage, qtbot: object
) -> None:
    engine, home = page.engine, page.engine.home
    window.show_page("Settings")
    assert not page.audit_box.isChecked()
    page.audit_box.click()  # as a user does (a wide box's centre is past its label)
    assert page.audit_box.isChecked()
    assert not page.audit_box.isEnabled()  # until the write is done: writes never overlap
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
    assert page.audit_box.isEnabled()
    raw = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))
    assert raw["audit_log"] is True and load_config(home).audit_log
    assert "Audit log on" in page.window_.notice.label.text()

    result = engine.chat(ChatRequest("Say hi, audit check.", sampling=GREEDY))
    lines = audit_log_path(home).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["Say hi, audit check."]
    assert json.loads(lines[0])["answer"] == result.answer

    page.audit_box.click()  # as a user does (a wide box's centre is past its label)
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
    assert not load_config(home).audit_log
    engine.chat(ChatRequest("Say bye, not recorded.", sampling=GREEDY))
    assert audit_log_path(home).read_text(encoding="utf-8").splitlines() == lines
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]


def test_a_refused_write_puts_the_switch_back(
    window: MainWindow, page: SettingsPage, qtbot: object
) -> None:
    blocker = page.engine.home / "config.toml"
    blocker.mkdir()  # a folder where the file goes: the write cannot succeed
    (blocker / "keep").write_text("x")
    page.audit_box.click()
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
    assert not page.audit_box.isChecked() and page.audit_box.isEnabled()
    assert window.notice.isVisible()
    assert "Audit log on" not in window.notice.label.text()


def test_audit_switch_reads_the_saved_setting(window: MainWindow, qtbot: object) -> None:
    from engine.config import update_config

    update_config(window.engine.home, audit_log=True)
    again = SettingsPage(window.engine, window)
    try:
        assert not again.audit_box.isEnabled()  # not clickable before the setting is read
        qtbot.waitUntil(lambda: not again.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
        assert again.audit_box.isChecked() and again.audit_box.isEnabled()
    finally:
        again.deleteLater()


def test_appearance_follows_the_system_and_can_be_chosen(page: SettingsPage, qtbot: object) -> None:
    assert page.theme_combo.currentData() == "system"
    assert "following the system" in page.scheme_label.text()
    page.theme_combo.setCurrentIndex(page.theme_combo.findData("dark"))
    qtbot.waitUntil(lambda: not page.busy, timeout=WAIT_MS)  # type: ignore[attr-defined]
    assert load_config(page.engine.home).theme == "dark"
    assert "chosen here (dark)" in page.scheme_label.text()
