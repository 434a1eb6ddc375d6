"""The queue of collection jobs (add files, re-index, remove), run one at a time.

One job runs at a time: the engine indexes one collection per call, two indexing jobs
would compete for the same cores, and a removal must not pull a collection's files from
under an indexing run. Jobs asked for meanwhile wait in order and start as soon as the
running one ends, whatever way it ends. ``cancel()`` stops the running job at the
engine's next check (what was committed stays) and forgets the waiting ones.

Each job runs through ``desktop.ops`` (the GUI's threading rule): the signals below are
delivered on the GUI thread. The page only wires widgets to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from PySide6.QtCore import QObject, Signal

from desktop import ops

if TYPE_CHECKING:
    from engine import Engine, JobContext

JobKind = Literal["add", "sync", "remove"]


@dataclass(frozen=True)
class CollectionJob:
    """One thing to do to a collection: add ``paths`` to it, re-index it, or remove it."""

    kind: JobKind
    collection: str
    paths: tuple[str, ...] = ()

    @property
    def indexes(self) -> bool:
        """Whether the job indexes files (and so reports progress and an ``IndexReport``)."""
        return self.kind != "remove"

    @property
    def title(self) -> str:
        """What the job does, in the user's words, while it runs."""
        return {
            "add": f"Adding to {self.collection}…",
            "sync": f"Syncing {self.collection}…",
            "remove": f"Removing {self.collection}…",
        }[self.kind]


class CollectionJobs(QObject):
    """Runs collection jobs one at a time, in the order they were asked for.

    Signals (GUI thread), for each job in this order: ``started(job)``, any number of
    ``progressed(Progress)``, then one of ``succeeded(job, result)`` (an ``IndexReport``
    for add and sync -- with ``cancelled`` set when it stopped midway -- the removed
    ``Collection`` for remove), ``failed(job, error)`` or ``cancelled(job)`` (stopped
    before the engine began), and ``finished(job, result)`` in every case (``result``
    None unless it succeeded). ``idle()`` follows the last job's ``finished`` when
    nothing waits. A failure goes to ``failed`` only: connect it (the page shows it).
    """

    started = Signal(object)  # CollectionJob
    progressed = Signal(object)  # Progress
    succeeded = Signal(object, object)  # CollectionJob, its result
    failed = Signal(object, object)  # CollectionJob, the exception
    cancelled = Signal(object)  # CollectionJob
    finished = Signal(object, object)  # CollectionJob, its result or None
    idle = Signal()

    def __init__(self, engine: Engine, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self._waiting: list[CollectionJob] = []
        self._current: CollectionJob | None = None
        self._operation: ops.Operation | None = None
        self._result: object = None

    # -- asking ---------------------------------------------------------------------------

    def add(self, collection: str, paths: list[str] | tuple[str, ...]) -> CollectionJob:
        """Add files or folders to ``collection`` and index them."""
        return self.submit(CollectionJob("add", collection, tuple(paths)))

    def sync(self, collection: str) -> CollectionJob:
        """Re-index what changed in ``collection`` and drop what was deleted."""
        return self.submit(CollectionJob("sync", collection))

    def remove(self, collection: str) -> CollectionJob:
        """Remove ``collection`` and its index (the user's files are not touched)."""
        return self.submit(CollectionJob("remove", collection))

    def submit(self, job: CollectionJob) -> CollectionJob:
        """Run ``job`` now if nothing runs, else after the jobs asked for before it."""
        self._waiting.append(job)
        if self._current is None:
            self._start_next()
        return job

    def cancel(self) -> None:
        """Stop the running job at the engine's next check, and forget the waiting ones."""
        self._waiting.clear()
        if self._operation is not None:
            self._operation.cancel()

    # -- state ----------------------------------------------------------------------------

    @property
    def current(self) -> CollectionJob | None:
        """The job running now."""
        return self._current

    @property
    def waiting(self) -> tuple[CollectionJob, ...]:
        """The jobs asked for and not started yet, in the order they will run."""
        return tuple(self._waiting)

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def cancelling(self) -> bool:
        """Whether the running job was asked to stop and has not yet."""
        return self._operation is not None and self._operation.ctx.cancelled

    # -- running --------------------------------------------------------------------------

    def _start_next(self) -> None:
        if not self._waiting:
            return
        job = self._current = self._waiting.pop(0)
        self._result = None
        self._operation = ops.run(
            self._job_function(job),
            on_success=lambda result: self._on_succeeded(job, result),
            on_failure=lambda exc: self.failed.emit(job, exc),
            on_progress=self.progressed.emit,
            on_cancel=lambda: self.cancelled.emit(job),
            on_finished=lambda: self._on_finished(job),
            parent=self,
            name=f"{job.kind}-{job.collection}",
        )
        self.started.emit(job)

    def _job_function(self, job: CollectionJob) -> Any:
        # The engine is reached from the worker, never from this (GUI) thread.
        engine, name, paths = self.engine, job.collection, list(job.paths)
        if job.kind == "add":
            return lambda ctx: engine.documents.add(name, paths, ctx)
        if job.kind == "sync":
            return lambda ctx: engine.documents.sync(name, ctx)

        def remove(ctx: JobContext) -> object:
            ctx.check_cancelled()  # cancelled while it waited its turn: nothing is removed
            return engine.documents.remove(name)

        return remove

    def _on_succeeded(self, job: CollectionJob, result: object) -> None:
        self._result = result
        self.succeeded.emit(job, result)

    def _on_finished(self, job: CollectionJob) -> None:
        result, self._result = self._result, None
        self._current = None
        self._operation = None
        self.finished.emit(job, result)
        if self._waiting:
            self._start_next()
        elif self._current is None:  # a ``finished`` slot may have submitted one already
            self.idle.emit()
