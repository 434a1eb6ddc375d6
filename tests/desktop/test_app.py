"""The main window opens with its pages, and start-up imports no heavy library."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from desktop.app import MainWindow


def test_window_title_and_pages(window: MainWindow) -> None:
    assert window.windowTitle() == "Bastion"
    titles = [window.sidebar.item(i).text() for i in range(window.sidebar.count())]
    assert titles == ["Chat", "Documents", "Models", "Fine-tune", "Compare", "Server", "Settings"]
    window.show_page("Models")
    assert window.stack.currentWidget() is window.models


def test_window_start_imports_no_heavy_library(tmp_path: object) -> None:
    code = (
        "import os, sys\n"
        "os.environ['QT_QPA_PLATFORM'] = 'offscreen'\n"
        f"os.environ['BASTION_HOME'] = {str(tmp_path)!r}\n"
        "from PySide6.QtWidgets import QApplication\n"
        "app = QApplication([])\n"
        "from engine import Engine\n"
        "from desktop.app import MainWindow\n"
        "w = MainWindow(Engine()); w.show(); app.processEvents()\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers', 'faiss',"
        " 'llama_cpp') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_qt_calls_do_not_leak_references_to_none(window: MainWindow) -> None:
    # PySide6 6.12's abi3 wheel dropped a reference to None per void call on Python 3.11,
    # which aborts a long session; pyproject.toml keeps it out.
    label = window.notice.label
    before = sys.getrefcount(None)
    for _ in range(20000):
        label.setText("x")
    assert abs(sys.getrefcount(None) - before) < 1000


def test_cycles_are_collected_on_the_gui_thread_only(window: Any, qtbot: Any) -> None:
    import gc
    import threading
    import weakref

    assert not gc.isenabled()  # no collection in whatever worker thread allocates next

    class Node:
        pass

    collected_in: list[threading.Thread] = []
    node = Node()
    node.me = node  # type: ignore[attr-defined]  # a cycle only the collector frees
    weakref.finalize(node, lambda: collected_in.append(threading.current_thread()))
    del node
    junk = [[] for _ in range(gc.get_threshold()[0] * 2)]  # past generation 0's threshold
    qtbot.waitUntil(lambda: bool(collected_in), timeout=5000)
    assert collected_in == [threading.main_thread()]
    del junk
