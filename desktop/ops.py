"""The GUI's one threading rule, and the operations that keep it.

**The rule: the GUI thread never calls the engine.** Every engine call -- the long ones
(indexing, an answer, training) and the quick ones alike (listing models, opening a
conversation, renaming it, saving a setting, reading the privacy guard) -- runs through
``run(...)`` or a helper built on it (``Refresher`` here, the documents page's
``CollectionJobs``), on a worker thread. What it returns comes back on the GUI thread,
through the callbacks given to ``run``; widgets are updated only there. A job takes
what it needs from the widgets when it starts (bound in its closure) and never reads
them from its thread.

Why quick calls too: the database connection is shared by every thread under one lock,
so a "millisecond" read waits for whatever an indexing or a training run is writing at
that moment, and the window freezes with it; and a rule with exceptions is a rule each
page decides again. What the GUI thread may still use of the engine: its types and
constants, pure helpers that touch nothing (``human_size``), and the attributes fixed
when the engine was made (``engine.home``). Never a method of the engine or of its
services, nor an engine function that reads or writes files, the database or process
state (configuration, the privacy guard, metrics files). tests/desktop/test_threading.py
checks every page against this rule.

**Failures are never lost.** ``run`` without ``on_failure`` hands a failure to
``report_failure``: it is logged (bugs, that is anything but a ``BastionError``, with
their traceback, where they happen) and passed to the failure handler the main window
installs with ``set_failure_handler`` -- a non-modal message with the error's text and
hint. ``Cancelled`` is a normal end: it arrives as ``cancelled()``, never as a failure,
and is never shown.

An operation runs a function on a worker thread with a ``JobContext``; it reports back on
the GUI thread through Qt signals: ``succeeded(result)``, ``failed(exception)``,
``cancelled()``, then ``finished()`` in every case. Progress is not sent per report:
the worker only stores the latest one, and a GUI-thread timer publishes it at most ten
times a second (``progressed(Progress)``), so a job that reports per token or per file
cannot flood the event loop. ``cancel()`` sets the job's cancel flag; the engine stops at
its next check.

A view that shows what the engine holds (a list, a table) reads it with a ``Refresher``:
one read at a time, asks made meanwhile folded into one more read, only the newest
answer shown.

Streams of text (chat tokens) use ``TextPump``: the worker appends to a buffer, and the
GUI takes what has accumulated every 30 ms -- smooth to the eye at any token rate.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from engine import BastionError, Cancelled, JobContext, Progress

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_MS = 100
TEXT_INTERVAL_MS = 30

FailureHandler = Callable[[BaseException], None]

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
    "pypdfium2",  # PDFium, loaded through ctypes: PDF page text
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


# -- failures nobody handled -----------------------------------------------------------

# The installed handler: (its key, a reference that gives it or None once it is gone).
_handler: list[tuple[int, Callable[[], FailureHandler | None]]] = []
_handler_keys = itertools.count(1)


def set_failure_handler(
    handler: FailureHandler | None, owner: QObject | None = None
) -> FailureHandler | None:
    """Install what shows a failure that no caller handled; returns the previous handler.

    The main window installs its non-modal message (``MainWindow.show_error``). A bound
    method is held weakly, and with ``owner`` the handler is dropped when ``owner`` is
    destroyed: a closed window is never asked to show anything. ``None`` uninstalls.
    """
    previous = failure_handler()
    _handler.clear()
    if handler is None:
        return previous
    key = next(_handler_keys)
    if inspect.ismethod(handler):
        _handler.append((key, weakref.WeakMethod(handler)))
    else:
        _handler.append((key, lambda: handler))
    if owner is not None:
        # Not a method of ``owner``: it is gone by the time ``destroyed`` is delivered.
        owner.destroyed.connect(lambda *_: _drop_handler(key))
    return previous


def _drop_handler(key: int) -> None:
    if _handler and _handler[0][0] == key:
        _handler.clear()


def failure_handler() -> FailureHandler | None:
    """The handler ``set_failure_handler`` installed, if it is still alive."""
    return _handler[0][1]() if _handler else None


def report_failure(exc: BaseException, name: str = "") -> None:
    """A failure that no caller handled: logged, then shown by the installed handler.

    ``Cancelled`` is a normal end and is dropped. The log names the operation and the
    error's type, not its message: a message may quote a file name or a model's output.
    """
    if isinstance(exc, Cancelled):
        return
    handler = failure_handler()
    log.log(
        logging.INFO if handler is not None else logging.ERROR,
        "operation %s failed with %s; %s",
        name or "(unnamed)",
        type(exc).__name__,
        "shown to the user" if handler is not None else "no failure handler is installed",
    )
    if handler is not None:
        handler(exc)


# -- operations --------------------------------------------------------------------------


class Operation(QObject):
    progressed = Signal(object)  # Progress
    succeeded = Signal(object)  # the function's result
    failed = Signal(object)  # the exception
    cancelled = Signal()
    finished = Signal()
    _done = Signal(str, object)  # worker -> GUI thread: ("ok" | "error" | "cancel", value)

    def __init__(
        self,
        fn: Callable[[JobContext], Any],
        name: str = "",
        parent: QObject | None = None,
        *,
        native: bool = True,
    ) -> None:
        super().__init__(parent)
        self.name = name or getattr(fn, "__name__", "operation")
        self.native = native
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
        if self.native:
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


def running(owner: QObject | None = None) -> list[Operation]:
    """The operations started and not yet finished; with ``owner``, only those started
    with ``owner`` or one of its descendants as parent (a page's, say)."""
    if owner is None:
        return list(_running)
    mine = []
    for op in list(_running):
        try:
            ancestor = op.parent()
            while ancestor is not None and ancestor is not owner:
                ancestor = ancestor.parent()
        except RuntimeError:  # its parent was deleted meanwhile
            continue
        if ancestor is owner:
            mine.append(op)
    return mine


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
    native: bool = True,
) -> Operation:
    """Start ``fn(ctx)`` off the GUI thread; the callbacks run on the GUI thread.

    Args:
        fn: the job; it runs on a worker thread and must not touch widgets.
        on_success: called with what ``fn`` returned.
        on_failure: called with the exception ``fn`` raised (never ``Cancelled``).
            Without it the failure goes to ``report_failure``: logged and shown.
        on_progress: throttled ``Progress`` reports (at most ten a second).
        on_cancel: ``fn`` ended with ``Cancelled`` (a normal end, never shown).
        on_finished: after any of the above, in every case.
        parent: the QObject whose lifetime bounds the callbacks (a page).
        name: for logs and the worker thread's name.
        native: whether ``fn`` may import the engine's native libraries (indexing,
            answers, model files, training): they are then preloaded on the GUI thread
            first (see ``NATIVE_MODULES``). Reads and writes of the database and of
            small files pass False: they import nothing native, and the window's first
            reads must not wait for llama.cpp and faiss to load.
    """
    op = Operation(fn, name, parent, native=native)
    if on_success is not None:
        op.succeeded.connect(on_success)
    if on_failure is not None:
        op.failed.connect(on_failure)
    else:
        op.failed.connect(lambda exc: report_failure(exc, op.name))
    if on_progress is not None:
        op.progressed.connect(on_progress)
    if on_cancel is not None:
        op.cancelled.connect(on_cancel)
    if on_finished is not None:
        op.finished.connect(on_finished)
    return op.start()


class Refresher(QObject):
    """Keeps one view (a list, a table, a picker) in step with what the engine holds.

    ``read()`` is called on the GUI thread when a read starts and returns the job to run
    off it, so the job can take what the view shows now (the search text, the collection
    picked). ``show(result)`` gets the answer on the GUI thread. One read runs at a time;
    asks made while it runs fold into one more read after it, and the running read's
    answer is then dropped as stale: the view shows only the newest answer, and a burst
    of asks costs two reads, not one per ask. ``then`` callbacks given to ``refresh`` run
    after the view shows a read that began after they were asked (and are dropped when
    that read fails). Reads are ``native=False`` operations (see ``run``).
    """

    shown = Signal()  # the view was updated from a fresh read

    def __init__(
        self,
        read: Callable[[], Callable[[JobContext], Any]],
        show: Callable[[Any], None],
        *,
        parent: QObject,
        name: str,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(parent)
        self.name = name
        self._read = read
        self._show = show
        self._on_failure = on_failure
        self._op: Operation | None = None
        self._again = False
        self._asked: list[Callable[[], None]] = []  # waiting for the next read to start
        self._covered: list[Callable[[], None]] = []  # satisfied by the read in flight

    @property
    def busy(self) -> bool:
        """Whether a read is in flight (or about to be)."""
        return self._op is not None

    def refresh(self, then: Callable[[], None] | None = None) -> None:
        """Read again (now, or right after the read in flight)."""
        if then is not None:
            self._asked.append(then)
        if self._op is not None:
            self._again = True
            return
        self._start()

    def _start(self) -> None:
        self._again = False
        self._covered, self._asked = self._asked, []
        job = self._read()
        self._op = run(
            job,
            on_success=self._on_success,
            on_failure=self._on_failed,
            on_finished=self._on_finished,
            parent=self,
            name=self.name,
            native=False,
        )

    def _on_success(self, result: object) -> None:
        if self._again:  # a newer read follows: this answer is stale already
            self._asked = self._covered + self._asked
            self._covered = []
            return
        self._show(result)
        callbacks, self._covered = self._covered, []
        for callback in callbacks:
            callback()
        self.shown.emit()

    def _on_failed(self, exc: BaseException) -> None:
        self._covered = []
        if self._on_failure is not None:
            self._on_failure(exc)
        else:
            report_failure(exc, self.name)

    def _on_finished(self) -> None:
        self._op = None
        if self._again:
            self._start()


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
