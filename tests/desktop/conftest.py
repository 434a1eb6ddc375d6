"""Desktop fixtures: the real main window, offscreen, on a real engine in a temporary home."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def window(home: Path, qtbot: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from desktop.app import MainWindow
    from engine import Engine

    # As the app does (desktop.app.main): the embedder's one-time export runs in a child.
    monkeypatch.setenv("BASTION_EMBEDDER_EXPORT_IN_CHILD", "1")

    engine = Engine(home)
    win = MainWindow(engine)
    qtbot.addWidget(win)  # type: ignore[attr-defined]
    win.show()
    yield win
    with contextlib.suppress(RuntimeError):  # pytest-qt may have deleted it already
        win.close()
    engine.close()
