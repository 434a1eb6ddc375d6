"""The messages between Bastion and its child processes (model host, trainer), in one place.

Both children speak JSON lines: one object per line. The parent writes requests on the
child's stdin (``{"op": "generate", "id": 7, ...}``, model host only); the child writes
events on its stdout (``{"event": "token", "id": 7, "text": "Hel"}``). A request's ``id``
comes back on every event that answers it, so one child can serve several callers.
Everything libraries print goes to stderr, which the parent keeps in a log file; the
child's stdout carries nothing but events (``EventWriter`` sees to it).

Exit codes are shared too: a child that ends on purpose says why through its code, and
anything else (a negative code: killed by a signal) is a crash the parent describes with
``describe_exit``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import IO, Any


class Event(StrEnum):
    """What a child reports (child to parent, key ``event``)."""

    # Both children.
    ERROR = "error"  # kind (ErrorKind), message; with ``id``: that request failed
    # The trainer (engine.train.worker).
    START = "start"  # backend, reason, device, total_steps
    STATUS = "status"  # message
    EVAL = "eval"  # phase ("before" | "after"), loss
    PROGRESS = "progress"  # step, total_steps, loss, lr, tokens_per_second, eta_seconds
    CHECKPOINT = "checkpoint"  # step
    STOPPED = "stopped"  # step
    RESUMED = "resumed"  # step
    DONE = "done"  # the run's results
    # The model host (engine.models.host).
    READY = "ready"  # pid, runtime (the self-tested configuration in use)
    RESULT = "result"  # id, value: the answer to a request
    TOKEN = "token"  # id, text: decoded text of one or more new tokens
    FINISHED = "finished"  # id, prompt_tokens, completion_tokens, ttft_s, total_s, stop_reason


class Op(StrEnum):
    """What the parent asks of the model host (parent to child, key ``op``)."""

    LOAD = "load"  # spec -> result {"load_s", "n_ctx"}
    UNLOAD = "unload"  # -> result null
    TOKENIZE = "tokenize"  # text, add_bos -> result [ids]
    SPECIAL_TOKENS = "special_tokens"  # -> result {"bos", "eos"} (their text)
    PERPLEXITY = "perplexity"  # tokens -> result {"scored", "nll"} (mean, nats per token)
    # tokens, top -> result {"pieces", "logprobs", "top"} (LoadedModel.score)
    SCORE = "score"
    DETOKENIZE = "detokenize"  # tokens -> result text
    GENERATE = "generate"  # tokens, sampling, started_offset_s -> token..., finished
    CANCEL = "cancel"  # target: the id of the generation to stop at its next token
    SHUTDOWN = "shutdown"  # unload and exit 0


class ErrorKind(StrEnum):
    INVALID = "invalid"  # the request cannot be done as asked (user's input)
    LOAD = "load"  # llama.cpp refused the model
    OOM = "oom"  # out of memory
    FAILED = "failed"  # anything else


class ExitCode(IntEnum):
    """How a child process ends on purpose."""

    OK = 0
    STOPPED = 3  # asked to stop; state saved (trainer: a checkpoint)
    OOM = 4
    INVALID = 5
    FAILED = 6


class ProtocolError(Exception):
    """A line that is not a message of this protocol."""


@dataclass(frozen=True)
class Message:
    """One decoded line: an event (from a child) or an op (to the model host)."""

    kind: str  # an Event or Op value
    fields: dict[str, Any]

    @property
    def id(self) -> int | None:
        value = self.fields.get("id")
        return value if isinstance(value, int) else None


def encode(key: str, kind: str, fields: dict[str, Any]) -> str:
    """One line (with its newline) for ``{key: kind, **fields}``."""
    return json.dumps({key: str(kind), **fields}, separators=(",", ":")) + "\n"


def decode(line: str | bytes, key: str = "event") -> Message:
    """The message on ``line``; ``key`` is ``event`` (from a child) or ``op`` (to the host).

    Raises:
        ProtocolError: not a JSON object with a string ``key``.
    """
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), str):
        raise ProtocolError(f"no {key!r} in the message")
    kind = data.pop(key)
    return Message(kind, data)


class EventWriter:
    """Writes events to the real stdout, which nothing else in the child may use.

    Created first thing in a child: it keeps a private copy of file descriptor 1 and
    points descriptor 1 at stderr, so ``print`` from any library (or C code writing to
    stdout) lands in the log instead of corrupting the event stream.
    """

    def __init__(self) -> None:
        sys.stdout.flush()
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        self._lock = threading.Lock()
        self._held: list[str] | None = None  # lines of the holding thread, not yet written
        self._holder: threading.Thread | None = None

    def __call__(self, event: Event, **fields: Any) -> None:
        line = encode("event", event, fields)
        with self._lock:
            if self._held is not None and threading.current_thread() is self._holder:
                self._held.append(line)
                return
            self._out.write(line)
            self._out.flush()

    def hold(self) -> None:
        """Keep this thread's events until ``release``: one write for a batch step's tokens
        instead of one per sequence (other threads' events still go out at once)."""
        with self._lock:
            self._held, self._holder = [], threading.current_thread()

    def release(self) -> None:
        with self._lock:
            lines, self._held, self._holder = self._held, None, None
            if lines:
                self._out.write("".join(lines))
                self._out.flush()


def describe_exit(code: int, what: str, inside: str = "native code") -> str:
    """A plain sentence for how ``what`` (e.g. "the model process") ended with ``code``.

    ``inside`` names where a crash happens (``llama.cpp`` for the model host).
    """
    if code >= 0:
        try:
            name = ExitCode(code).name.lower()
        except ValueError:
            name = "unexpected"
        return f"{what} exited with code {code} ({name})"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"{what} was ended by signal {-code}"
    why = {
        signal.SIGSEGV: f"a memory fault inside {inside}",
        signal.SIGBUS: f"a memory fault inside {inside}",
        signal.SIGILL: "an instruction this CPU does not have",
        signal.SIGFPE: f"an arithmetic fault inside {inside}",
        signal.SIGABRT: f"{inside} stopped on an internal error, e.g. a CUDA error",
        signal.SIGKILL: "out of memory, by the kernel's OOM killer, or another program",
        signal.SIGTERM: "by another program",
    }.get(sig)
    if sig in (signal.SIGKILL, signal.SIGTERM):
        return f"{what} was killed by {sig.name}{f' ({why})' if why else ''}"
    return f"{what} crashed ({sig.name}{': ' + why if why else ''})"
