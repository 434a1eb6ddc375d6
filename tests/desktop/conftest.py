"""Desktop fixtures: the real main window, offscreen, on a real engine in a temporary home."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def window(home: Path, qtbot: object) -> Iterator[object]:
    from desktop.app import MainWindow
    from engine import Engine

    # As the app does (desktop.app.main): the embedder's one-time export runs in a child.
    engine = Engine(home, embedder_export_in_child=True)
    win = MainWindow(engine)
    qtbot.addWidget(win)  # type: ignore[attr-defined]
    win.show()
    yield win
    with contextlib.suppress(RuntimeError):  # pytest-qt may have deleted it already
        win.close()
    engine.close()


# Exports the default embedder to ONNX into the folder given as argv[1].
_EXPORT = (
    "import sys; from pathlib import Path; from engine.rag.embedder import get_embedder; "
    "get_embedder('all-minilm-l6-v2', cache_dir=Path(sys.argv[1]))"
)


@pytest.fixture(scope="session")
def embedder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedder export for the whole session (each test has its own home), made in a
    child process: the export imports torch, and torch imported on a worker thread while
    the Qt event loop runs crashed this process now and then (a segfault in the GUI
    thread; reported to the lead). Loading the export afterwards needs only ONNX Runtime.
    """
    folder = tmp_path_factory.mktemp("embedder-cache")
    subprocess.run([sys.executable, "-c", _EXPORT, str(folder)], check=True, timeout=600)
    return folder


@pytest.fixture
def shared_embedder(home: Path, embedder_cache: Path) -> Path:
    """The session's embedder export, linked into this test's home; returns the home."""
    (home / "cache").mkdir(parents=True, exist_ok=True)
    (home / "cache" / "embedders").symlink_to(embedder_cache, target_is_directory=True)
    return home
