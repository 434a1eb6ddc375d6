"""A one-line progress bar on stderr with rate and ETA, redrawn at most ten times a second."""

from __future__ import annotations

import sys
import time

from engine.jobs import Progress


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressBar:
    """Draws ``Progress`` reports; silent when stderr is not a terminal, except at the end."""

    def __init__(self, what: str = "files", width: int = 24) -> None:
        self.what = what
        self.width = width
        self._last = 0.0
        self._drawn = False
        self._tty = sys.stderr.isatty()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        final = p.total is not None and p.done >= p.total
        if not self._tty or (now - self._last < 0.1 and not final):
            return
        self._last = now
        if p.total:
            filled = int(self.width * min(p.done / p.total, 1.0))
            bar = "#" * filled + "-" * (self.width - filled)
            eta = p.eta_seconds
            tail = f" ETA {_duration(eta)}" if eta is not None and not final else ""
            line = f"[{bar}] {int(p.done)}/{int(p.total)} {self.what}{tail}  {p.label}"
        else:
            line = f"{int(p.done)} {self.what}  {p.label}"
        sys.stderr.write("\r\033[K" + line[:160])
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
