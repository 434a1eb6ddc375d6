"""The model host: the child process that holds the loaded llama.cpp model.

    python -m engine.models.host CONFIG

A native crash in llama.cpp (a CPU-feature bug, a CUDA abort, the OOM killer) ends this
process, never the app, the CLI or the server that started it: the parent's lane
(``engine.models.lane``) ends the answer in progress with a clear message and starts a
fresh host for the next request. CONFIG is the runtime configuration the self-test
passed (``engine.models.selftest``).

Requests arrive on stdin, events leave on stdout (``engine.protocol``). A reader thread
takes requests off stdin so that a ``cancel`` reaches a generation between two tokens;
the main thread does the model's work, one request at a time, in arrival order -- or,
for a model loaded with ``parallel`` > 1 (the server's), runs every generation together
in one batch (``engine.models.batching``), taking new requests between two steps. Requests
carry ids and every event names the request it answers, so several callers can share
one host. Stdin closing (the parent died) ends the host.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from engine.errors import BastionError, InvalidInput, ModelLoadError
from engine.jobs import JobContext
from engine.protocol import ErrorKind, Event, EventWriter, ExitCode, Message, Op, decode
from engine.protocol import ProtocolError as BadLine

log = logging.getLogger("bastion.model-host")


class Host:
    """The host's state: the loaded model and the generations that may be cancelled."""

    def __init__(self, emit: EventWriter, config: str) -> None:
        self.emit = emit
        self.config = config
        self.model: Any = None  # engine.models.runtime.LoadedModel, imported lazily
        self.batch: Any = None  # engine.models.batching.BatchEngine when parallel > 1
        self._deferred: list[Message] = []  # a load of another model, until the batch ends
        # Held while the model is swapped; a batched host tokenizes on the reader thread
        # under it, without waiting for the batch step in progress.
        self._model_lock = threading.Lock()
        self.requests: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._generations: dict[int, JobContext] = {}
        self._lock = threading.Lock()

    # -- stdin ------------------------------------------------------------------------

    def read_requests(self) -> None:
        """Reader thread: queue requests; act on ``cancel`` at once; EOF ends the host."""
        for raw in sys.stdin.buffer:
            try:
                message = decode(raw, key="op")
            except BadLine:
                log.warning("ignoring a line that is not a request")
                continue
            if message.kind == Op.CANCEL:
                with self._lock:
                    ctx = self._generations.get(int(message.fields.get("target", -1)))
                if ctx is not None:
                    ctx.cancel("cancelled by the caller")
                continue
            if message.kind in (Op.TOKENIZE, Op.DETOKENIZE) and self._tokenize_now(message):
                continue
            self.requests.put(message)
            if message.kind == Op.SHUTDOWN:
                return
        # The parent is gone: stop what runs, then end.
        with self._lock:
            for ctx in self._generations.values():
                ctx.cancel("the parent process ended")
        self.requests.put(None)

    def _tokenize_now(self, message: Message) -> bool:
        """Answer a (de)tokenize request here when a batched model is loaded (the vocabulary
        is read-only: safe beside a decode); False to leave it to the main thread."""
        with self._model_lock:
            if self.batch is None or self.model is None:
                return False
            try:
                value = self._vocabulary(self.model, message)
            except BastionError as exc:
                self.emit(Event.ERROR, id=message.id, kind=error_kind(exc), message=exc.message)
                return True
        self.emit(Event.RESULT, id=message.id, value=value)
        return True

    @staticmethod
    def _vocabulary(model: Any, message: Message) -> Any:
        """The answer to a tokenize or detokenize request."""
        fields = message.fields
        if message.kind == Op.TOKENIZE:
            return model.tokenize(str(fields["text"]), bool(fields["add_bos"]))
        tokens = [int(t) for t in fields["tokens"]]
        model.check_tokens(tokens)
        return "".join(model.pieces(tokens))

    # -- the work -----------------------------------------------------------------------

    def serve(self) -> int:
        while True:
            message: Message | None
            if self.batch is not None and self.batch.active:
                try:  # take what came in since the last step, else do the next step
                    message = self.requests.get_nowait()
                except queue.Empty:
                    self.step()
                    continue
            elif self._deferred:
                message = self._deferred.pop(0)
            else:
                message = self.requests.get()
            if message is None or message.kind == Op.SHUTDOWN:
                self.unload()
                return ExitCode.OK
            if self._must_wait(message):
                self._deferred.append(message)
                continue
            try:
                self.handle(message)
            except BastionError as exc:
                self.emit(
                    Event.ERROR,
                    id=message.id,
                    kind=error_kind(exc),
                    message=exc.message,
                    hint=exc.hint,
                )
            except MemoryError:
                self.emit(Event.ERROR, id=message.id, kind=ErrorKind.OOM, message="out of memory")
            except Exception as exc:  # a bug or a library fault: the parent shows one line
                log.exception("request %s failed", message.kind)
                self.emit(
                    Event.ERROR,
                    id=message.id,
                    kind=ErrorKind.FAILED,
                    message=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                )

    def _must_wait(self, message: Message) -> bool:
        """A load of another model, or an unload, waits for the running batch to end."""
        if self.batch is None or not self.batch.active:
            return False
        if message.kind in (Op.UNLOAD, Op.PERPLEXITY, Op.SCORE):
            return True
        if message.kind == Op.LOAD:
            from engine.models.runtime import LoadSpec

            return bool(self.model is None or self.model.spec != LoadSpec(**message.fields["spec"]))
        return False

    def step(self) -> None:
        """One batch step; a failure ends every generation in it with the error."""
        self.emit.hold()
        try:
            self.batch.step()
        except Exception as exc:  # llama.cpp refused the batch: every answer in it fails
            log.exception("batch step failed")
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.batch.fail_all(lambda s: s.emit_error(text))
        finally:
            self.emit.release()

    def handle(self, message: Message) -> None:
        op, fields, rid = message.kind, message.fields, message.id
        if op == Op.LOAD:
            self.emit(Event.RESULT, id=rid, value=self.load(fields["spec"]))
        elif op == Op.UNLOAD:
            self.unload()
            self.emit(Event.RESULT, id=rid, value=None)
        elif op in (Op.TOKENIZE, Op.DETOKENIZE):
            self.emit(Event.RESULT, id=rid, value=self._vocabulary(self.loaded(), message))
        elif op == Op.PERPLEXITY:
            if self.batch is not None:
                self.batch.forget()  # scoring clears the cache the free slots keep
            scored, nll = self.loaded().perplexity(list(fields["tokens"]))
            self.emit(Event.RESULT, id=rid, value={"scored": scored, "nll": nll})
        elif op == Op.SCORE:
            model = self.loaded()
            if self.batch is not None:
                self.batch.forget()  # as for perplexity
            value = model.score([int(t) for t in fields["tokens"]], int(fields["top"]))
            self.emit(Event.RESULT, id=rid, value=value)
        elif op == Op.SPECIAL_TOKENS:
            bos, eos = self.loaded().special_tokens()
            self.emit(Event.RESULT, id=rid, value={"bos": bos, "eos": eos})
        elif op == Op.GENERATE:
            self.generate(rid, fields)
        else:
            raise InvalidInput(f"the model host does not know the request {op!r}")

    def loaded(self) -> Any:
        if self.model is None:
            raise InvalidInput("no model is loaded")
        return self.model

    def load(self, spec_fields: dict[str, Any]) -> dict[str, Any]:
        from engine.models.runtime import LoadedModel, LoadSpec

        spec = LoadSpec(**spec_fields)
        if self.model is not None and self.model.spec == spec:
            return {"load_s": 0.0, "n_ctx": self.model.n_ctx}
        self.unload()
        started = time.perf_counter()
        model = LoadedModel(spec, self.config)
        with self._model_lock:
            self.model = model
            if spec.parallel > 1:
                from engine.models.batching import BatchEngine

                self.batch = BatchEngine(self.model, spec.parallel)
        elapsed = time.perf_counter() - started
        log.info("loaded %s in %.2f s (%s)", spec.model_id, elapsed, self.config)
        return {"load_s": elapsed, "n_ctx": self.model.n_ctx}

    def unload(self) -> None:
        with self._model_lock:
            self._unload()

    def _unload(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        if self.model is not None:
            self.model.close()
            self.model = None

    def generate(self, rid: int | None, fields: dict[str, Any]) -> None:
        from engine.models.runtime import SamplingParams, StreamEvent, TokenChunk

        model = self.loaded()
        assert rid is not None
        model.check_tokens(list(fields["tokens"]))  # ids may come from an API client
        ctx = JobContext()
        with self._lock:
            self._generations[rid] = ctx
        emit = self.emit

        def relay(event: StreamEvent) -> None:
            if isinstance(event, TokenChunk):
                emit(Event.TOKEN, id=rid, text=event.text)
            else:
                emit(Event.FINISHED, id=rid, **asdict(event))

        params = SamplingParams(**fields["sampling"])
        if self.batch is not None:

            def relay_batched(event: StreamEvent) -> None:
                relay(event)
                if not isinstance(event, TokenChunk):
                    with self._lock:
                        self._generations.pop(rid, None)

            try:
                # Times count from arrival here too; the answer comes from later steps.
                self.batch.add(list(fields["tokens"]), params, ctx, time.perf_counter(),
                               relay_batched, lambda text: self._fail(rid, text))  # fmt: skip
            except BaseException:
                with self._lock:
                    self._generations.pop(rid, None)
                raise
            return
        try:
            # Times in FINISHED count from this request's arrival; the parent adds its side.
            model.generate(list(fields["tokens"]), params, ctx, time.perf_counter(), relay)
        finally:
            with self._lock:
                self._generations.pop(rid, None)

    def _fail(self, rid: int, text: str) -> None:
        with self._lock:
            self._generations.pop(rid, None)
        self.emit(Event.ERROR, id=rid, kind=ErrorKind.FAILED, message=text)


def error_kind(exc: BastionError) -> ErrorKind:
    if isinstance(exc, ModelLoadError):
        return ErrorKind.LOAD
    return ErrorKind.INVALID if isinstance(exc, InvalidInput) else ErrorKind.FAILED


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    emit = EventWriter()  # first: from here on, stdout carries only events
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    from engine.models.runtime import RUNTIME_CONFIGS
    from engine.privacy import guard

    guard.activate()
    # The host has its own session, but a terminal's Ctrl-C must never end it mid-answer:
    # the parent cancels between two tokens instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = args[0] if args else "default"
    if config not in RUNTIME_CONFIGS:
        emit(Event.ERROR, kind=ErrorKind.INVALID, message=f"unknown configuration {config!r}")
        return ExitCode.INVALID
    host = Host(emit, config)
    threading.Thread(target=host.read_requests, name="requests", daemon=True).start()
    import llama_cpp  # noqa: F401 -- before READY: a load request then only loads

    emit(Event.READY, pid=os.getpid(), runtime=config)
    return host.serve()


if __name__ == "__main__":
    sys.exit(main())
