"""Per-key limits of the server: requests and tokens per minute, requests at once.

A sliding window of the last 60 seconds per key: a request is admitted when the key has
made fewer than ``rpm`` requests and used fewer than ``tpm`` tokens in it, and has fewer
than ``concurrent`` requests running; otherwise the caller answers 429 with the seconds
until the window has room (``Retry-After``). Tokens are counted when a request ends (its
prompt and completion), so a key over its budget is stopped at its next request.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    running: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted, and when to try again."""

    message: str
    retry_after_s: int


WINDOW_S = 60.0


class Limiter:
    """Admission per key name; thread-safe."""

    def __init__(self, concurrent: int = 4, clock: object = time.monotonic) -> None:
        self.concurrent = concurrent
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self.refused = 0  # 429s so far, for the status page

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        """Count a request of ``key`` in, or say why not (then nothing is counted)."""
        with self._lock:
            now = self._now()
            window = self._windows.setdefault(key, _Window())
            while window.requests and window.requests[0] <= now - WINDOW_S:
                window.requests.popleft()
            while window.tokens and window.tokens[0][0] <= now - WINDOW_S:
                window.tokens.popleft()
            refusal = None
            if window.running >= self.concurrent:
                refusal = Refusal(f"{self.concurrent} requests of this key are running", 1)
            elif rpm is not None and len(window.requests) >= rpm:
                wait = window.requests[0] + WINDOW_S - now
                refusal = Refusal(f"rate limit of {rpm} requests per minute reached", _up(wait))
            elif tpm is not None and sum(n for _, n in window.tokens) >= tpm:
                wait = window.tokens[0][0] + WINDOW_S - now
                refusal = Refusal(f"rate limit of {tpm} tokens per minute reached", _up(wait))
            if refusal is not None:
                self.refused += 1
                return refusal
            window.requests.append(now)
            window.running += 1
            return None

    def done(self, key: str, tokens: int) -> None:
        """A request of ``key`` ended, having used ``tokens``."""
        with self._lock:
            window = self._windows.setdefault(key, _Window())
            window.running = max(0, window.running - 1)
            if tokens > 0:
                window.tokens.append((self._now(), tokens))


def _up(seconds: float) -> int:
    return max(1, math.ceil(seconds))
