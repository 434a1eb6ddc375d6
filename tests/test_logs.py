"""The engine's log file: one per home, given up when the engine closes, quiet once removed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from engine import Engine
from engine.logs import _file_handler, _log_path, _new_handler

log = logging.getLogger("engine.test_logs")


def _text(home: Path) -> str:
    return _log_path(home).read_text(encoding="utf-8")


def test_a_closed_engine_no_longer_writes_into_its_homes_log(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    Engine(first).close()
    engine = Engine(second)
    log.warning("a line for the second home")
    engine.close()
    assert "a line for the second home" in _text(second)
    assert "a line for the second home" not in _text(first)
    assert _file_handler(_log_path(first)) is None and _file_handler(_log_path(second)) is None


def test_engines_on_one_home_share_its_log_until_the_last_closes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    one, two = Engine(home), Engine(home)
    one.close()
    one.close()  # a second close is no second release
    log.warning("while the other engine is open")
    assert _file_handler(_log_path(home)) is not None
    two.close()
    log.warning("after both closed")
    text = _text(home)
    assert "while the other engine is open" in text and "after both closed" not in text


def test_a_log_whose_home_was_removed_drops_records_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    handler = _new_handler(_log_path(home), logging.INFO)
    try:
        shutil.rmtree(home)
        handler.close()  # as after a rollover: the next record opens the file again
        handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "late", (), None))
    finally:
        handler.close()
    assert capsys.readouterr().err == ""
