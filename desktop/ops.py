"""The one way the GUI runs anything slow: an ``Operation`` off the GUI thread.

An operation runs a function on a worker thread with a ``JobContext``; it reports back on
the GUI thread through Qt signals: ``succeeded(result)``, ``failed(exception)``,
``cancelled()``, then ``finished()`` in every case. Progress is not sent per report:
the worker only stores the latest one, and a GUI-thread timer publishes it at most ten
times a second (``progressed(Progress)``), so a job that reports per token or per file
cannot flood the event loop. ``cancel()`` sets the job's cancel flag; the engine stops at
its next check.

Streams of text (chat tokens) use ``TextPump``: the worker appends to a buffer, and the
GUI takes what has accumulated every 30 ms — smooth to the eye at any token rate.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from engine.errors import BastionError, Cancelled
from engine.jobs import JobContext, Progress

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_MS = 100
TEXT_INTERVAL_MS = 30

# Operations alive now: kept referenced until they finish, so Python doesn't collect them.
_running: set[Operation] = set()

# Native libraries the engine loads lazily. Their first import initializes C/C++ runtimes
# (OpenMP pools, static constructors); done on a worker thread while the Qt loop runs, it
# has crashed the GUI thread (a segfault while faiss loaded). So they are imported here,
# on the GUI thread, once: after the first paint, or at the latest before the first
# operation starts. torch is kept out of the app's process altogether (the embedder's
# export runs in a child; training always does).
NATIVE_MODULES = (
    "numpy",
    "faiss",
    "onnxruntime",
    "tokenizers",
    "llama_cpp",
    # pypdf imports cryptography (Rust, pyo3): a collection while it loaded on an
    # indexing worker crashed the suite with SIGSEGV; lxml is python-docx's parser.
    "cryptography",
    "pypdf",
    "lxml.etree",
)
_preloaded: set[str] = set()


def preload_native() -> None:
    """Import ``NATIVE_MODULES`` on the calling (GUI) thread, once per process."""
    if _preloaded:
        return
    _preloaded.update(NATIVE_MODULES)
    for name in NATIVE_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # a missing optional library: the engine reports it when used
            log.warning("could not preload %s", name, exc_info=True)


class Operation(QObject):
    progressed = Signal(object)  # Progress
    succeeded = Signal(object)  # the function's result
    failed = Signal(object)  # the exception
    cancelled = Signal()
    finished = Signal()
    _done = Signal(str, object)  # worker -> GUI thread: ("ok" | "error" | "cancel", value)

    def __init__(
        self, fn: Callable[[JobContext], Any], name: str = "", parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self.name = name or getattr(fn, "__name__", "operation")
        self._fn = fn
        self._latest: Progress | None = None
        self._lock = threading.Lock()
        self.ctx = JobContext(on_progress=self._store_progress)
        self._timer = QTimer(self)
        self._timer.setInterval(PROGRESS_INTERVAL_MS)
        self._timer.timeout.connect(self._publish_progress)
        self._done.connect(self._on_done)
        self.running = False

    def start(self) -> Operation:
        preload_native()
        self.running = True
        _running.add(self)
        self._timer.start()
        threading.Thread(target=self._work, name=f"op-{self.name}", daemon=True).start()
        return self

    def cancel(self) -> None:
        self.ctx.cancel("cancelled")

    def _store_progress(self, progress: Progress) -> None:
        with self._lock:
            self._latest = progress

    def _publish_progress(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is not None:
            self.progressed.emit(latest)

    def _work(self) -> None:
        try:
            result = self._fn(self.ctx)
        except Cancelled as exc:
            outcome: tuple[str, object] = ("cancel", exc.with_traceback(None))
        except BastionError as exc:
            # Expected errors travel without their traceback: its frames (this one among
            # them) would keep this QObject in a reference cycle, and the collector could
            # then free it on whatever thread it runs in -- a crash for a QObject.
            outcome = ("error", exc.with_traceback(None))
        except Exception as exc:  # a bug: logged with its traceback, shown by the caller
            log.exception("operation %s failed", self.name)
            outcome = ("error", exc)
        else:
            outcome = ("ok", result)
        try:
            self._done.emit(*outcome)
        except RuntimeError:  # the page that started it was closed meanwhile: nobody listens
            _running.discard(self)
        finally:
            # A bug's traceback holds this frame: drop the frame's hold on the exception,
            # so that no cycle through this QObject is left for the collector.
            outcome = ("done", None)
            result = None

    def _on_done(self, kind: str, value: object) -> None:
        self._publish_progress()
        self._timer.stop()
        self.running = False
        if kind == "ok":
            self.succeeded.emit(value)
        elif kind == "cancel":
            self.cancelled.emit()
        else:
            self.failed.emit(value)
        self.finished.emit()
        _running.discard(self)


def running() -> list[Operation]:
    """The operations started and not yet finished."""
    return list(_running)


def run(
    fn: Callable[[JobContext], Any],
    *,
    on_success: Callable[[Any], None] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_cancel: Callable[[], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    parent: QObject | None = None,
    name: str = "",
) -> Operation:
    """Start ``fn(ctx)`` off the GUI thread; the callbacks run on the GUI thread."""
    op = Operation(fn, name, parent)
    if on_success is not None:
        op.succeeded.connect(on_success)
    if on_failure is not None:
        op.failed.connect(on_failure)
    if on_progress is not None:
        op.progressed.connect(on_progress)
    if on_cancel is not None:
        op.cancelled.connect(on_cancel)
    if on_finished is not None:
        op.finished.connect(on_finished)
    return op.start()


class TextPump(QObject):
    """Collects text from a worker thread; hands it to the GUI in batches every 30 ms."""

    text = Signal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._parts: list[str] = []
        self._lock = threading.Lock()
        self._timer = QTimer(self)
        self._timer.setInterval(TEXT_INTERVAL_MS)
        self._timer.timeout.connect(self.flush)

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        self.flush()

    def push(self, piece: str) -> None:
        """Called from any thread."""
        with self._lock:
            self._parts.append(piece)

    def flush(self) -> None:
        with self._lock:
            parts, self._parts = self._parts, []
        if parts:
            self.text.emit("".join(parts))
