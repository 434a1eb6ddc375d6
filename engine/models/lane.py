"""The model lane: the engine's proxy for the model host process.

The loaded model lives in a child process (``engine.models.host``), so a native crash in
llama.cpp ends one answer, not the app. The lane starts the host on first use with the
runtime configuration the self-test passed, sends it requests (``engine.protocol``) and
routes its events back by request id: several threads may use one lane at once, and the
host serves them in turn. Tokens stream back as they are made; a cancelled job is told to
the host, which stops between two tokens.

When the host dies (SIGSEGV, an abort on a CUDA error, the OOM killer), every request in
flight fails with ``ModelCrashed``, whose message names what happened; the next request
starts a fresh host. After ``keep_alive`` seconds without a request the host is stopped,
which gives its RAM and VRAM back; the next request starts one again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import (
    EnvironmentFault,
    InvalidInput,
    ModelCrashed,
    ModelLoadError,
    OperationFailed,
)
from engine.jobs import JobContext
from engine.models.runtime import GenerationDone, LoadSpec, SamplingParams, StreamEvent, TokenChunk
from engine.paths import open_private
from engine.protocol import ErrorKind, Event, Message, Op, ProtocolError, decode, describe_exit
from engine.protocol import encode as encode_line

log = logging.getLogger(__name__)

_SHUTDOWN_GRACE_S = 10.0
_CANCEL_POLL_S = 0.05  # how often a waiting stream looks at its job's cancel flag

# What a request's queue receives: an event, or the host's death (a message).
_Item = Message | ModelCrashed


@dataclass
class _Host:
    """One running host process and what the lane knows of it."""

    proc: subprocess.Popen[bytes]
    config: str
    spec: LoadSpec | None = None
    stopping: bool = False  # a shutdown we asked for: its end is not a crash
    dead: ModelCrashed | None = None
    ready: threading.Event = field(default_factory=threading.Event)  # llama.cpp imported


class ModelLane:
    """Owns the model host process: at most one, holding at most one model."""

    def __init__(
        self,
        log_path: Path,
        keep_alive: Callable[[], float | None] = lambda: None,
        runtime_config: Callable[[Path | None], str] | None = None,
    ) -> None:
        """
        Args:
            log_path: the file that receives the host's stderr (llama.cpp's own lines).
            keep_alive: seconds without a request before the host is stopped (asked each
                time, so a changed setting takes effect); None or negative: never.
            runtime_config: the self-tested configuration to load models with, given a
                model that may serve as the probe; ``selftest_config`` by default.
        """
        self._log_path = log_path
        self._keep_alive = keep_alive
        self._runtime_config = runtime_config or selftest_config
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._host: _Host | None = None
        self._pending: dict[int, tuple[_Host, queue.SimpleQueue[_Item]]] = {}
        self._next_id = 1
        self._idle_timer: threading.Timer | None = None

    # -- the process ------------------------------------------------------------------

    @property
    def host_pid(self) -> int | None:
        """The host's process id while one runs (tests and ``doctor`` look at it)."""
        host = self._host
        return host.proc.pid if host is not None and host.dead is None else None

    @property
    def loaded_spec(self) -> LoadSpec | None:
        host = self._host
        return host.spec if host is not None and host.dead is None else None

    def start(self, probe_model: Path | None = None, wait: float | None = None) -> None:
        """Start the host now, if none runs, so that the first load does not wait for it.

        With ``wait``, return once it is ready (llama.cpp imported), or after that many
        seconds. An idle host started this way is stopped after ``keep_alive`` too.
        """
        with self._lock:
            host = self._ensure_host(probe_model)
            if not self._pending:
                self._cancel_idle_timer()
                self._arm_idle_timer()
        if wait is not None:
            host.ready.wait(wait)

    def _ensure_host(self, probe_model: Path | None = None) -> _Host:
        with self._lock:
            host = self._host
            if host is not None and host.dead is None and host.proc.poll() is None:
                return host
            config = self._runtime_config(probe_model)
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            # 0600: llama.cpp's messages name the user's model files.
            with open(open_private(self._log_path, os.O_WRONLY | os.O_APPEND), "ab") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "engine.models.host", config],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    # Its own session: Ctrl-C in a terminal reaches the CLI, which cancels
                    # the answer between two tokens, instead of killing the host.
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            host = _Host(proc, config)
            self._host = host
            threading.Thread(
                target=self._read_events, args=(host,), name="model-host-events", daemon=True
            ).start()
            log.info("model host started (pid %d, %s configuration)", proc.pid, config)
            return host

    def _read_events(self, host: _Host) -> None:
        """Route the host's events to the requests waiting for them, until it ends."""
        assert host.proc.stdout is not None
        for raw in host.proc.stdout:
            try:
                message = decode(raw)
            except ProtocolError:
                continue
            rid = message.id
            if rid is None:
                if message.kind == Event.READY:
                    host.ready.set()
                elif message.kind == Event.ERROR:
                    log.error("model host: %s", message.fields.get("message"))
                continue
            with self._lock:
                entry = self._pending.get(rid)
            if entry is not None:
                entry[1].put(message)
        code = host.proc.wait()
        what = describe_exit(code, "the model process", "llama.cpp")
        with self._lock:
            if host.stopping and code >= 0:
                log.info("model host stopped (pid %d)", host.proc.pid)
                crashed = ModelCrashed(f"{what} while stopping")
            else:
                # Info, not error: the request that was waiting reports it to the user.
                log.info("%s (pid %d)", what, host.proc.pid)
                crashed = ModelCrashed(
                    what,
                    hint="the next request starts a fresh one; `bastion doctor` checks the "
                    f"llama.cpp build; its log: {self._log_path}",
                )
            host.dead = crashed
            waiting_all = [q for h, q in self._pending.values() if h is host]
        for waiting in waiting_all:
            waiting.put(crashed)

    def _send(self, host: _Host, op: Op, fields: dict[str, Any]) -> None:
        line = encode_line("op", op, fields).encode("utf-8")
        stdin = host.proc.stdin
        assert stdin is not None
        try:
            with self._write_lock:
                stdin.write(line)
                stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # it died: the reader reports how to everyone waiting

    def _open(
        self, op: Op, fields: dict[str, Any], probe_model: Path | None = None
    ) -> tuple[_Host, int, queue.SimpleQueue[_Item]]:
        """Send a request; returns the host, the request id and the queue of its events."""
        with self._lock:
            self._cancel_idle_timer()
            host = self._ensure_host(probe_model)
            rid = self._next_id
            self._next_id += 1
            waiting: queue.SimpleQueue[_Item] = queue.SimpleQueue()
            self._pending[rid] = (host, waiting)
        self._send(host, op, {"id": rid, **fields})
        return host, rid, waiting

    def _close(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)
            if not self._pending:
                self._arm_idle_timer()

    def _call(self, op: Op, probe_model: Path | None = None, **fields: Any) -> Any:
        """One request, one result."""
        _host, rid, waiting = self._open(op, fields, probe_model)
        try:
            item = waiting.get()
        finally:
            self._close(rid)
        if isinstance(item, ModelCrashed):
            raise ModelCrashed(item.message, item.hint)
        if item.kind == Event.ERROR:
            raise _error(item)
        return item.fields.get("value")

    # -- requests -------------------------------------------------------------------------

    def load(self, spec: LoadSpec) -> float:
        """Make ``spec`` the loaded model (no-op if it is). Returns seconds spent loading."""
        with self._lock:
            host = self._host
            if host is not None and host.dead is None and host.spec == spec:
                return 0.0
        started = time.perf_counter()
        result = self._call(Op.LOAD, Path(spec.path), spec=asdict(spec))
        with self._lock:
            if self._host is not None:
                self._host.spec = spec
        if not result.get("load_s"):
            return 0.0
        return time.perf_counter() - started

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return list(self._call(Op.TOKENIZE, text=text, add_bos=add_bos))

    def perplexity(self, tokens: list[int]) -> tuple[int, float]:
        """How many of ``tokens`` the loaded model scored, and their mean negative
        log-likelihood (nats per token)."""
        value = self._call(Op.PERPLEXITY, tokens=tokens)
        return int(value["scored"]), float(value["nll"])

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (special tokens written out)."""
        return str(self._call(Op.DETOKENIZE, tokens=tokens))

    def score(self, tokens: list[int], top: int) -> dict[str, Any]:
        """Each token's log-probability given those before it, with the ``top`` most likely
        tokens at each position (``LoadedModel.score``); one context window at most."""
        return dict(self._call(Op.SCORE, tokens=tokens, top=top))

    def special_tokens(self) -> tuple[str, str]:
        """The text of the loaded model's BOS and EOS tokens."""
        value = self._call(Op.SPECIAL_TOKENS)
        return str(value["bos"]), str(value["eos"])

    def stream(
        self, tokens: list[int], params: SamplingParams, ctx: JobContext, started: float
    ) -> Iterator[StreamEvent]:
        """Generate; yields text chunks as they are made, then one ``GenerationDone``.

        ``started`` (``time.perf_counter()``) is where time to first token counts from.
        Cancelling ``ctx``, or leaving the loop early, stops the host at its next token.

        Raises:
            ModelCrashed: the host died; the chunks already yielded are all there is.
        """
        host, rid, waiting = self._open(Op.GENERATE, {"tokens": tokens, "sampling": asdict(params)})
        sent = time.perf_counter()
        cancel_sent = False
        finished = False
        try:
            while True:
                if ctx.cancelled and not cancel_sent:
                    self._send(host, Op.CANCEL, {"target": rid})
                    cancel_sent = True
                try:
                    item = waiting.get(timeout=_CANCEL_POLL_S)
                except queue.Empty:
                    continue
                if isinstance(item, ModelCrashed):
                    raise ModelCrashed(item.message, item.hint)
                if item.kind == Event.TOKEN:
                    yield TokenChunk(str(item.fields["text"]))
                elif item.kind == Event.FINISHED:
                    f = item.fields
                    host_ttft = f.get("ttft_s")
                    finished = True
                    yield GenerationDone(
                        prompt_tokens=int(f["prompt_tokens"]),
                        completion_tokens=int(f["completion_tokens"]),
                        # The host counts from the request's arrival; add the way there.
                        ttft_s=None if host_ttft is None else (sent - started) + host_ttft,
                        total_s=time.perf_counter() - started,
                        stop_reason=str(f["stop_reason"]),
                    )
                    return
                elif item.kind == Event.ERROR:
                    finished = True
                    raise _error(item)
        finally:
            if not finished and not cancel_sent and host.dead is None:
                self._send(host, Op.CANCEL, {"target": rid})
            self._close(rid)

    # -- lifetime -------------------------------------------------------------------------

    def unload(self, wait: bool = True) -> None:
        """Stop the host, which gives back all the memory the model held.

        Without ``wait``, only tell it to go: it frees the model and exits by itself
        (about 0.2 s), which a closing program need not sit through.
        """
        with self._lock:
            host, self._host = self._host, None
            self._cancel_idle_timer()
        if host is not None:
            _stop(host, self._send, wait)

    def close(self) -> None:
        self.unload(wait=False)

    def _arm_idle_timer(self) -> None:
        keep_alive = self._keep_alive()
        if keep_alive is None or keep_alive < 0 or self._host is None:
            return
        timer = threading.Timer(keep_alive, self._on_idle)
        timer.daemon = True
        self._idle_timer = timer
        timer.start()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        with self._lock:
            if self._pending or self._host is None:
                return
            host, self._host = self._host, None
            self._idle_timer = None
        log.info("model host idle: stopping it to give its memory back")
        _stop(host, self._send)


def _stop(
    host: _Host, send: Callable[[_Host, Op, dict[str, Any]], None], wait: bool = True
) -> None:
    host.stopping = True
    if host.proc.poll() is None:
        send(host, Op.SHUTDOWN, {})
        with contextlib.suppress(OSError):
            if host.proc.stdin is not None:
                host.proc.stdin.close()
        if not wait:
            return  # its reader thread collects the exit status
        try:
            host.proc.wait(timeout=_SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                host.proc.send_signal(signal.SIGKILL)
            host.proc.wait()


def _error(message: Message) -> Exception:
    """The engine error for an ``error`` event from the host."""
    text = str(message.fields.get("message") or "the model host failed")
    hint = message.fields.get("hint")
    kind = message.fields.get("kind")
    if kind == ErrorKind.LOAD:
        return ModelLoadError(text, hint)
    if kind == ErrorKind.INVALID:
        return InvalidInput(text, hint)
    if kind == ErrorKind.OOM:
        return EnvironmentFault(
            "the model process ran out of memory",
            hint="use a smaller model or context, or close other programs",
        )
    return OperationFailed(text, hint)


_verdict_config: dict[str, str] = {}  # once per process: the verdict does not change


def selftest_config(probe_model: Path | None) -> str:
    """The configuration the self-test passed for the installed llama.cpp build.

    Set-up runs the self-test; when its verdict is missing or stale (llama.cpp rebuilt,
    the environment copied to another CPU), it runs here once, probing with the default
    model or else ``probe_model``.

    Raises:
        OperationFailed: no configuration passed; llama.cpp is not safe to use here.
    """
    if "config" in _verdict_config:
        return _verdict_config["config"]
    from engine.models import selftest

    verdict = selftest.read_verdict()
    if verdict is not None and not verdict.settled and "retried" not in _verdict_config:
        _verdict_config["retried"] = "yes"  # its probes hung: once more, in this process
        verdict = None
    if verdict is None:
        model = selftest.default_model_path() or probe_model
        if model is None:
            return "default"  # nothing to probe with; nothing to load either
        log.warning("llama.cpp has no self-test verdict for this build: testing it now")
        verdict = selftest.run_selftest(model)
        log.warning("%s", verdict.summary())
    if verdict.config is None:
        raise OperationFailed(
            verdict.summary(),
            hint="`bastion doctor` says more; `python3 installer/bootstrap.py setup` "
            "rebuilds llama.cpp without native CPU flags",
        )
    _verdict_config["config"] = verdict.config
    return verdict.config
