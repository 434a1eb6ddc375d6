"""Job context: how long engine calls report progress and learn they were cancelled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """One progress report. ``total`` is None while unknown."""

    done: float
    total: float | None
    label: str
    elapsed: float
    eta: float | None = None  # the job's own estimate, when it knows better than the average
    detail: Mapping[str, Any] | None = None  # job-specific numbers (e.g. loss, tokens/s)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left: the job's estimate, else at the average rate so far, else None."""
        if self.eta is not None:
            return self.eta
        if not self.total or self.done <= 0 or self.elapsed <= 0:
            return None
        rate = self.done / self.elapsed
        return max(self.total - self.done, 0) / rate


ProgressSink = Callable[[Progress], None]


@dataclass
class JobContext:
    """Progress sink plus cancel flag, handed to every long engine call.

    The engine calls ``report`` and ``check_cancelled``; it never knows who watches.
    ``cancel`` may be called from any thread (a signal handler, the GUI thread).
    """

    on_progress: ProgressSink | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _started: float = field(default_factory=time.monotonic)
    reason: str | None = None

    def report(
        self,
        done: float,
        total: float | None = None,
        label: str = "",
        *,
        eta: float | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        if self.on_progress is not None:
            elapsed = time.monotonic() - self._started
            self.on_progress(Progress(done, total, label, elapsed, eta, detail))

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise ``Cancelled`` if the user asked to stop."""
        if self._cancel.is_set():
            raise Cancelled(self.reason or "cancelled")
