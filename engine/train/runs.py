"""Training runs on record (SQLite) and the child process that does the training.

A run's row says where it stands (running, stopped, failed, done) and survives any crash:
a row left ``running`` by a process that no longer exists reads as failed. The child is
started in its own session, so a Ctrl-C in the terminal reaches only the parent, which
asks the child to stop (SIGTERM: it saves a checkpoint first) and waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from engine.errors import Cancelled, InvalidInput, OperationFailed
from engine.jobs import JobContext
from engine.paths import open_private
from engine.protocol import Event, ExitCode, ProtocolError, decode, describe_exit
from engine.store.db import Database
from engine.train.results import FinetuneResult

_STOP_GRACE_S = 120.0  # a checkpoint of a large adapter can take a while to write
_DB_UPDATE_S = 2.0


@dataclass(frozen=True)
class RunRecord:
    name: str
    base: str
    base_source: str
    status: str
    run_dir: Path
    pid: int | None
    step: int
    total_steps: int | None
    error: str | None
    result: FinetuneResult | None  # once the run is done


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, name: str) -> RunRecord | None:
        row = self._db.query_one("SELECT * FROM training_runs WHERE name = ?", (name,))
        if row is None:
            return None
        status = row["status"]
        error = row["error"]
        if status == "running" and not _alive(row["pid"]):
            status, error = "failed", error or "the training process ended without finishing"
        return RunRecord(
            name=row["name"],
            base=row["base"],
            base_source=row["base_source"],
            status=status,
            run_dir=Path(row["run_dir"]),
            pid=row["pid"],
            step=row["step"],
            total_steps=row["total_steps"],
            error=error,
            result=FinetuneResult.from_public(json.loads(row["result"])) if row["result"] else None,
        )

    def list(self) -> list[RunRecord]:
        names = [r["name"] for r in self._db.query("SELECT name FROM training_runs ORDER BY 1")]
        return [run for run in map(self.get, names) if run is not None]

    def start(self, name: str, base: str, base_source: str, run_dir: Path) -> None:
        now = _now()
        self._db.execute(
            "INSERT INTO training_runs (name, base, base_source, status, run_dir, created_at, "
            "updated_at) VALUES (?, ?, ?, 'running', ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
            "status = 'running', error = NULL, pid = NULL, base = excluded.base, "
            "base_source = excluded.base_source, run_dir = excluded.run_dir, "
            "updated_at = excluded.updated_at",
            (name, base, base_source, str(run_dir), now, now),
        )

    def update(self, name: str, **fields: Any) -> None:
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{key} = ?" for key in fields)
        self._db.execute(
            f"UPDATE training_runs SET {columns}, updated_at = ? WHERE name = ?",
            (*fields.values(), _now(), name),
        )

    def delete(self, name: str) -> None:
        self._db.execute("DELETE FROM training_runs WHERE name = ?", (name,))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "engine.train.worker" in " ".join(
            process.cmdline()
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass
class WorkerOutcome:
    done: dict[str, Any]
    start: dict[str, Any]


def run_worker(
    runs: RunStore,
    name: str,
    run_dir: Path,
    resume: bool,
    ctx: JobContext,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> WorkerOutcome:
    """Run the training child to its end, relaying progress; raise on any other ending.

    Raises:
        Cancelled: ``ctx`` was cancelled; the child saved a checkpoint and stopped.
        OperationFailed: out of memory, or the child failed or was killed.
        InvalidInput: the child refused the run (e.g. an unusable backend).
    """
    command = [sys.executable, "-m", "engine.train.worker", str(run_dir)]
    if resume:
        command.append("--resume")
    log_path = run_dir / "worker.log"
    with open(open_private(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    runs.update(name, pid=proc.pid)
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                message = decode(raw)
            except ProtocolError:
                continue
            # Relayed as the dict the worker wrote: progress details travel as they are.
            events.put({"event": message.kind, **message.fields})
        events.put(None)

    threading.Thread(target=read, daemon=True).start()
    start: dict[str, Any] = {}
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    step = 0
    total: int | None = None
    stop_sent_at: float | None = None
    last_db = 0.0
    finished = False
    try:
        while not finished:
            if ctx.cancelled and stop_sent_at is None:
                stop_sent_at = time.monotonic()
                _signal(proc, signal.SIGTERM)
            if stop_sent_at is not None and time.monotonic() - stop_sent_at > _STOP_GRACE_S:
                _signal(proc, signal.SIGKILL)
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event is None:
                finished = True
                continue
            kind = event.get("event")
            if on_event is not None:
                on_event(event)
            if kind == Event.START:
                start = event
                total = event.get("total_steps")
                runs.update(name, total_steps=total)
                ctx.report(
                    0,
                    total,
                    f"{event['backend']} on {event['device']}: {event['reason']}",
                    detail=event,
                )
            elif kind == Event.STATUS:
                ctx.report(step, total, str(event.get("message", "")), detail=event)
            elif kind == Event.PROGRESS:
                step = int(event["step"])
                label = f"loss {event['loss']:.3f} · {event['tokens_per_second']:.0f} tok/s"
                ctx.report(step, total, label, eta=event.get("eta_seconds"), detail=event)
                if time.monotonic() - last_db >= _DB_UPDATE_S:
                    runs.update(name, step=step)
                    last_db = time.monotonic()
            elif kind in (Event.CHECKPOINT, Event.STOPPED, Event.RESUMED):
                step = int(event["step"])
                runs.update(name, step=step)
            elif kind == Event.DONE:
                done = event
            elif kind == Event.ERROR:
                error = event
        code = proc.wait()
    except BaseException:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
        runs.update(name, status="stopped", step=step, pid=None)
        raise
    finally:
        if proc.stdin is not None:
            proc.stdin.close()

    where = f"at step {step} of {total}" if total and step else "before the first training step"
    if code == 0 and done is not None:
        runs.update(name, step=int(done.get("steps", step)), pid=None)
        return WorkerOutcome(done=done, start=start)
    if code == ExitCode.STOPPED:
        runs.update(name, status="stopped", step=step, pid=None)
        raise Cancelled(
            f"training stopped {where}; the checkpoint is kept: "
            f"`bastion finetune --name {name} --resume` continues it"
        )
    message = (error or {}).get("message") or ""
    if code == ExitCode.INVALID:
        runs.update(name, status="failed", error=message, pid=None)
        raise InvalidInput(message)
    if code == ExitCode.OOM:
        text = f"training ran out of memory {where}" + _allocation(message)
        runs.update(name, status="failed", error=text, pid=None)
        raise OperationFailed(
            text,
            hint="lower --batch-size, --tokens-per-batch or --max-length, use a smaller "
            "--rank, or close other programs",
        )
    if code < 0:
        text = f"{describe_exit(code, 'the training process')} {where}"
    else:
        text = f"the training process failed ({message}) {where}"
    runs.update(name, status="failed", error=text, pid=None)
    has_checkpoint = any((run_dir / "checkpoints").glob("step-*/state.json"))
    raise OperationFailed(
        text,
        hint=(
            f"the last checkpoint is kept: add --resume to continue; log: {log_path}"
            if has_checkpoint
            else f"details in {log_path}"
        ),
    )


def _allocation(message: str) -> str:
    """`` (a 1.0 MiB allocation failed)`` from an allocator's message, when it says."""
    import re

    found = re.search(r"allocate (\d+) bytes", message) or re.search(
        r"allocate ([\d.]+ [KMGT]i?B)", message
    )
    if found is None:
        return ""
    size = found.group(1)
    if size.isdigit():
        size = f"{int(size) / 2**20:.1f} MiB"
    return f" (an allocation of {size} failed)"


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
