"""Python's cycle collector, run on the GUI thread only while the app is up.

Automatic collection runs in whichever thread happens to allocate when a threshold is
crossed. In the app that is often an operation's worker thread (indexing, importing
pypdf), and a collection there can finalize Qt wrappers that belong to the GUI thread:
the test suite died with SIGSEGV inside "Garbage-collecting" on a worker importing
``cryptography``. So while a window lives, automatic collection is off and this timer
collects on the GUI thread instead, generation by generation when the counts say so
(the same thresholds Python itself would use). qutebrowser does the same for the same
reason.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

INTERVAL_MS = 250


class GuiThreadCollector(QObject):
    """Turns automatic collection off for its lifetime and collects on a GUI-thread timer."""

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.setInterval(INTERVAL_MS)
        self._timer.timeout.connect(self.collect)
        self._timer.start()
        # Counted: a window closed (its ``destroyed`` delivered) after the next one opened
        # must not turn automatic collection back on under it.
        _alive[0] += 1
        gc.disable()
        # Not a method: the object is gone by the time ``destroyed`` is delivered.
        self.destroyed.connect(_collector_gone)

    def collect(self) -> int:
        """Collect the generations whose allocation counts passed their thresholds."""
        thresholds = gc.get_threshold()
        counts = gc.get_count()
        found = 0
        for generation in range(3):
            if counts[generation] <= thresholds[generation]:
                break
            found += gc.collect(generation)
        return found


_alive = [0]  # collectors alive in this process


def _collector_gone() -> None:
    _alive[0] -= 1
    if _alive[0] <= 0:
        _alive[0] = 0
        gc.enable()
