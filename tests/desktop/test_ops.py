"""desktop.ops: a failure nobody handles is shown and logged; Refresher shows the newest read."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PySide6.QtCore import QObject
from pytestqt.qtbot import QtBot

from desktop import ops
from desktop.app import MainWindow
from engine.errors import Cancelled, NotFound
from engine.jobs import JobContext

WAIT_MS = 10_000


@pytest.fixture
def caught(qtbot: QtBot) -> Iterator[list[BaseException]]:
    """A failure handler that records what it is given (the previous one is put back)."""
    seen: list[BaseException] = []
    previous = ops.set_failure_handler(seen.append)
    yield seen
    ops.set_failure_handler(previous)


def _fail_with(exc: BaseException) -> Callable[[JobContext], Any]:
    def fn(_ctx: JobContext) -> Any:
        raise exc

    return fn


def _wait_done(qtbot: QtBot, op: ops.Operation) -> None:
    qtbot.waitUntil(lambda: not op.running, timeout=WAIT_MS)


def test_a_failure_nobody_handles_goes_to_the_installed_handler(
    qtbot: QtBot, caught: list[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    error = NotFound("no such collection: notes", hint="create it first")
    with caplog.at_level(logging.INFO, logger="desktop.ops"):
        op = ops.run(_fail_with(error), name="read-notes", native=False)
        _wait_done(qtbot, op)
    assert caught == [error]
    record = next(r for r in caplog.records if r.name == "desktop.ops")
    assert "read-notes" in record.getMessage() and "NotFound" in record.getMessage()
    assert "no such collection" not in record.getMessage()  # messages may quote user data


def test_a_bug_nobody_handles_is_shown_and_logged_with_its_traceback(
    qtbot: QtBot, caught: list[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="desktop.ops"):
        op = ops.run(_fail_with(ZeroDivisionError("boom")), name="buggy", native=False)
        _wait_done(qtbot, op)
    assert len(caught) == 1 and isinstance(caught[0], ZeroDivisionError)
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_a_failure_the_caller_handles_is_not_shown_again(
    qtbot: QtBot, caught: list[BaseException]
) -> None:
    handled: list[BaseException] = []
    op = ops.run(_fail_with(NotFound("gone")), on_failure=handled.append, native=False)
    _wait_done(qtbot, op)
    assert [str(e) for e in handled] == ["gone"]
    assert caught == []


def test_a_cancellation_is_never_shown(qtbot: QtBot, caught: list[BaseException]) -> None:
    cancels: list[bool] = []
    op = ops.run(_fail_with(Cancelled("stop")), on_cancel=lambda: cancels.append(True))
    _wait_done(qtbot, op)
    assert cancels == [True] and caught == []
    ops.report_failure(Cancelled("stop"))  # even handed over directly
    assert caught == []


def test_without_a_handler_the_failure_is_logged_as_an_error(
    qtbot: QtBot, caplog: pytest.LogCaptureFixture
) -> None:
    previous = ops.set_failure_handler(None)
    try:
        with caplog.at_level(logging.INFO, logger="desktop.ops"):
            op = ops.run(_fail_with(NotFound("gone")), name="orphan", native=False)
            _wait_done(qtbot, op)
    finally:
        ops.set_failure_handler(previous)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "desktop.ops"]
    assert errors and "orphan" in errors[0].getMessage()


def test_a_handler_is_dropped_with_its_owner(qtbot: QtBot) -> None:
    previous = ops.failure_handler()
    owner = QObject()
    seen: list[BaseException] = []
    ops.set_failure_handler(seen.append, owner=owner)
    try:
        assert ops.failure_handler() is not None
        with qtbot.waitSignal(owner.destroyed, timeout=WAIT_MS):
            owner.deleteLater()
        assert ops.failure_handler() is None
    finally:
        ops.set_failure_handler(previous)


def test_the_main_window_shows_a_failure_nobody_handled(window: MainWindow, qtbot: QtBot) -> None:
    assert ops.failure_handler() == window.show_error
    error = NotFound("no such model: tiny", hint="import it on the Models page")
    op = ops.run(_fail_with(error), name="orphan", native=False)
    _wait_done(qtbot, op)
    assert window.notice.isVisible()
    text = window.notice.label.text()
    assert "no such model: tiny" in text and "import it on the Models page" in text
    window.notice.hide()
    op = ops.run(_fail_with(Cancelled("stop")), native=False)
    _wait_done(qtbot, op)
    assert not window.notice.isVisible()


# -- Refresher -------------------------------------------------------------------------------


class _View(QObject):
    """A view whose reads block until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.started: list[int] = []
        self.shown: list[int] = []
        self.gates: dict[int, threading.Event] = {}
        self.reader = ops.Refresher(self.job, self.shown.append, parent=self, name="view")

    def job(self) -> Callable[[JobContext], int]:
        self.asked += 1
        serial = self.asked
        self.started.append(serial)
        gate = self.gates.setdefault(serial, threading.Event())

        def read(_ctx: JobContext) -> int:
            assert gate.wait(WAIT_MS / 1000)
            return serial

        return read


def test_refresher_folds_asks_into_one_more_read_and_shows_only_the_newest(
    qtbot: QtBot,
) -> None:
    view = _View()
    done: list[str] = []
    view.reader.refresh(then=lambda: done.append("first"))
    assert view.started == [1] and view.reader.busy
    for _ in range(5):  # a burst while the first read runs
        view.reader.refresh()
    view.reader.refresh(then=lambda: done.append("second"))
    assert view.started == [1]  # one read at a time
    view.gates[1].set()
    qtbot.waitUntil(lambda: view.started == [1, 2], timeout=WAIT_MS)
    assert view.shown == [] and done == []  # the first answer was stale: dropped
    view.gates[2].set()
    with qtbot.waitSignal(view.reader.shown, timeout=WAIT_MS):
        pass
    qtbot.waitUntil(lambda: not view.reader.busy, timeout=WAIT_MS)
    assert view.started == [1, 2] and view.shown == [2]
    assert done == ["first", "second"]


def test_refresher_failure_is_reported_and_its_callbacks_dropped(
    qtbot: QtBot, caught: list[BaseException]
) -> None:
    owner = QObject()
    done: list[bool] = []
    reader = ops.Refresher(
        lambda: _fail_with(NotFound("gone")), done.append, parent=owner, name="failing"
    )
    reader.refresh(then=lambda: done.append(True))
    qtbot.waitUntil(lambda: not reader.busy, timeout=WAIT_MS)
    assert [str(e) for e in caught] == ["gone"] and done == []


def test_running_lists_the_operations_of_an_owner_and_its_children(qtbot: QtBot) -> None:
    page, other = QObject(), QObject()
    child = QObject(page)
    gate = threading.Event()
    mine = ops.run(lambda _ctx: gate.wait(WAIT_MS / 1000), parent=child, native=False)
    theirs = ops.run(lambda _ctx: gate.wait(WAIT_MS / 1000), parent=other, native=False)
    try:
        assert ops.running(page) == [mine]
        assert set(ops.running()) >= {mine, theirs}
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not ops.running(page) and not ops.running(other), timeout=WAIT_MS)
