"""The documents page's job queue on a real engine: order, signals, cancel, failures."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QObject
from pytestqt.qtbot import QtBot

from desktop.documents.controller import CollectionJob, CollectionJobs
from engine.errors import NotFound
from engine.jobs import Progress
from engine.rag.indexer import IndexReport
from tests.rag_corpus import FILLER

INDEX_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.usefixtures("shared_embedder")


class Recorder:
    """Every signal of a ``CollectionJobs``, in order, with the thread it arrived on."""

    def __init__(self, jobs: CollectionJobs) -> None:
        self.events: list[tuple[str, Any]] = []
        self.threads: set[threading.Thread] = set()
        self.progress: list[Progress] = []
        for name in ("started", "succeeded", "failed", "cancelled", "finished", "idle"):
            getattr(jobs, name).connect(lambda *args, name=name: self._record(name, args))
        jobs.progressed.connect(self._on_progress)

    def _record(self, name: str, args: tuple[Any, ...]) -> None:
        self.threads.add(threading.current_thread())
        self.events.append((name, args))

    def _on_progress(self, progress: Progress) -> None:
        self.threads.add(threading.current_thread())
        self.progress.append(progress)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for event, args in self.events if event == name]


@pytest.fixture
def jobs(engine: Any, qtbot: QtBot) -> Iterator[CollectionJobs]:
    owner = QObject()
    controller = CollectionJobs(engine, owner)
    yield controller
    controller.cancel()  # a failed test must not leave a thread writing to a closed db
    qtbot.waitUntil(lambda: not controller.busy, timeout=INDEX_TIMEOUT_MS)


def _files(root: Path, count: int, lines: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        body = "\n".join(f"{FILLER[(i + k) % len(FILLER)]} Note {i}.{k}." for k in range(lines))
        (root / f"note-{i:02d}.txt").write_text(body + "\n", encoding="utf-8")
    return root


def test_jobs_run_one_at_a_time_in_the_order_asked(
    engine: Any, jobs: CollectionJobs, qtbot: QtBot, tmp_path: Path
) -> None:
    engine.documents.create("first")
    engine.documents.create("second")
    seen = Recorder(jobs)
    with qtbot.waitSignal(jobs.idle, timeout=INDEX_TIMEOUT_MS):
        add_first = jobs.add("first", [str(_files(tmp_path / "a", 2))])
        assert jobs.current == add_first and jobs.busy
        add_second = jobs.add("second", [str(_files(tmp_path / "b", 3))])
        sync_first = jobs.sync("first")
        assert jobs.current == add_first  # the others wait their turn
        assert jobs.waiting == (add_second, sync_first)

    assert seen.names() == ["started", "succeeded", "finished"] * 3 + ["idle"]
    assert [args[0] for args in seen.of("started")] == [add_first, add_second, sync_first]
    reports = [args[1] for args in seen.of("finished")]
    assert all(isinstance(r, IndexReport) for r in reports)
    assert [r.indexed for r in reports] == [2, 3, 0]
    assert reports[2].unchanged == 2  # the sync found nothing new
    assert [args[1] for args in seen.of("succeeded")] == reports
    assert seen.threads == {threading.main_thread()}  # every signal on the GUI thread
    assert {p.total for p in seen.progress} >= {2, 3}  # throttled, but from each add
    assert not jobs.busy and jobs.current is None and jobs.waiting == ()
    assert engine.documents.status("second")[1]["indexed"] == 3


def test_remove_waits_for_the_running_job_then_removes(
    engine: Any, jobs: CollectionJobs, qtbot: QtBot, tmp_path: Path
) -> None:
    engine.documents.create("keep")
    engine.documents.create("drop")
    seen = Recorder(jobs)
    with qtbot.waitSignal(jobs.idle, timeout=INDEX_TIMEOUT_MS):
        jobs.add("keep", [str(_files(tmp_path / "k", 2))])
        removal = jobs.remove("drop")
        assert removal.title == "Removing drop…" and not removal.indexes
        assert jobs.waiting == (removal,)
    started = [args[0].kind for args in seen.of("started")]
    assert started == ["add", "remove"]
    job, removed = seen.of("finished")[-1]
    assert job == removal and removed.name == "drop"
    assert [c.name for c, _ in engine.documents.all()] == ["keep"]


def test_a_failed_job_is_reported_and_the_next_one_still_runs(
    engine: Any, jobs: CollectionJobs, qtbot: QtBot, tmp_path: Path
) -> None:
    engine.documents.create("real")
    seen = Recorder(jobs)
    with qtbot.waitSignal(jobs.idle, timeout=INDEX_TIMEOUT_MS):
        missing = jobs.add("missing", [str(_files(tmp_path / "m", 1))])
        after = jobs.add("real", [str(tmp_path / "m")])
    assert seen.names() == [
        "started", "failed", "finished", "started", "succeeded", "finished", "idle",
    ]  # fmt: skip
    job, error = seen.of("failed")[0]
    assert job == missing and isinstance(error, NotFound)
    assert seen.of("finished")[0] == (missing, None)  # no result when it failed
    assert seen.of("finished")[1][0] == after and seen.of("finished")[1][1].indexed == 1


def test_cancel_stops_the_running_job_and_forgets_the_waiting_ones(
    engine: Any, jobs: CollectionJobs, qtbot: QtBot, tmp_path: Path
) -> None:
    engine.documents.create("big")
    engine.documents.create("later")
    # Seconds per file: time to cancel in the middle.
    big = _files(tmp_path / "big", 5, lines=100)
    seen = Recorder(jobs)
    with qtbot.waitSignal(jobs.idle, timeout=INDEX_TIMEOUT_MS):
        running = jobs.add("big", [str(big)])
        jobs.add("later", [str(_files(tmp_path / "later", 1))])
        jobs.remove("later")
        qtbot.waitUntil(lambda: any(p.done >= 1 for p in seen.progress), timeout=INDEX_TIMEOUT_MS)
        jobs.cancel()
        assert jobs.cancelling and jobs.waiting == ()
    assert [args[0] for args in seen.of("started")] == [running]  # the waiting never ran
    job, report = seen.of("finished")[0]
    assert job == running and report.cancelled, "indexing ended before the cancel"
    assert 1 <= report.indexed < 5
    assert [c.name for c, _ in engine.documents.all()] == ["big", "later"]
    assert engine.documents.status("later")[1]["indexed"] == 0


def test_a_job_asked_for_from_a_finished_slot_runs_before_idle(
    engine: Any, jobs: CollectionJobs, qtbot: QtBot, tmp_path: Path
) -> None:
    engine.documents.create("docs")
    folder = _files(tmp_path / "d", 1)
    seen = Recorder(jobs)
    chained: list[CollectionJob] = []

    def chain(job: CollectionJob, _result: object) -> None:
        if job.kind == "add":
            chained.append(jobs.sync("docs"))

    jobs.finished.connect(chain)
    with qtbot.waitSignal(jobs.idle, timeout=INDEX_TIMEOUT_MS):
        jobs.add("docs", [str(folder)])
    assert [args[0].kind for args in seen.of("started")] == ["add", "sync"]
    assert seen.names().count("idle") == 1 and seen.names()[-1] == "idle"
