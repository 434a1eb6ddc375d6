"""The model lane: one thread that owns the loaded llama.cpp model and does all its work.

llama.cpp contexts are not safe to share between threads, and a model is expensive to
load, so exactly one worker thread holds it. Everything that touches the model (load,
tokenize, generate) is a task on that thread; callers block on the result or consume a
stream of tokens. Generation checks the job's cancel flag between tokens.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.errors import ModelLoadError, OperationFailed
from engine.jobs import JobContext

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how a model is loaded; a new spec means a reload."""

    model_id: str
    path: str
    n_ctx: int
    n_threads: int
    n_gpu_layers: int
    lora_path: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None


@dataclass(frozen=True)
class TokenChunk:
    """Text decoded from one or more new tokens."""

    text: str


@dataclass(frozen=True)
class GenerationDone:
    """The end of a stream, with its numbers."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # request start to first token
    total_s: float
    stop_reason: str  # "stop" (end of turn), "length", "context" or "cancelled"

    @property
    def tokens_per_second(self) -> float | None:
        """Generation rate after the first token (prompt processing excluded)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        span = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 else None


StreamEvent = TokenChunk | GenerationDone


class LoadedModel:
    """A llama.cpp model as seen from the lane thread. Never use it from another thread."""

    def __init__(self, spec: LoadSpec) -> None:
        import llama_cpp

        self.spec = spec
        try:
            self.llm = llama_cpp.Llama(
                model_path=spec.path,
                n_ctx=spec.n_ctx,
                n_threads=spec.n_threads,
                n_threads_batch=spec.n_threads,
                n_gpu_layers=spec.n_gpu_layers,
                lora_path=spec.lora_path,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load model {spec.model_id}: {exc}",
                hint="the file may use an architecture this llama.cpp build does not support",
            ) from exc
        self.n_ctx = self.llm.n_ctx()
        vocab = getattr(getattr(self.llm, "_model", None), "vocab", None)
        self._is_eog: Callable[[int], bool]
        if vocab is not None and hasattr(llama_cpp, "llama_vocab_is_eog"):
            self._is_eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        else:
            eos = self.llm.token_eos()
            self._is_eog = lambda tok: tok == eos

    def token_text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def generate(
        self,
        tokens: list[int],
        params: SamplingParams,
        ctx: JobContext,
        started: float,
        emit: Callable[[StreamEvent], None],
    ) -> None:
        """Generate after ``tokens``, calling ``emit`` for each piece of text, then once done."""
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        produced = 0
        ttft: float | None = None
        stop = "length"
        if budget <= 0:
            stop = "context"
        else:
            stream = self.llm.generate(
                tokens,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=params.min_p,
                temp=params.temperature,
                repeat_penalty=params.repeat_penalty,
            )
            try:
                for token in stream:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    if self._is_eog(token):
                        stop = "stop"
                        break
                    produced += 1
                    piece = decoder.decode(self.llm.detokenize([token]))
                    if piece:
                        emit(TokenChunk(piece))
                    if ctx.cancelled:
                        stop = "cancelled"
                        break
                    if produced >= budget:
                        stop = "length" if produced >= params.max_tokens else "context"
                        break
            finally:
                stream.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            emit(TokenChunk(tail))
        emit(
            GenerationDone(
                prompt_tokens=len(tokens),
                completion_tokens=produced,
                ttft_s=ttft,
                total_s=time.perf_counter() - started,
                stop_reason=stop,
            )
        )

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


class _Task:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


_STOP = object()


class ModelLane:
    """Owns at most one loaded model on one worker thread."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[_Task | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="model-lane", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _STOP:
                if self._model is not None:
                    self._model.close()
                    self._model = None
                return
            assert isinstance(task, _Task)
            try:
                task.result = task.fn()
            except BaseException as exc:
                task.error = exc
            finally:
                task.done.set()

    def submit(self, fn: Callable[[], T]) -> _Task:
        """Queue ``fn`` on the lane thread; see ``call`` for the blocking form."""
        self._ensure_thread()
        task = _Task(fn)
        self._tasks.put(task)
        return task

    def call(self, fn: Callable[[LoadedModel], T]) -> T:
        """Run ``fn(model)`` on the lane thread and return its result."""

        def with_model() -> T:
            if self._model is None:
                raise OperationFailed("no model is loaded")
            return fn(self._model)

        task = self.submit(with_model)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[no-any-return]

    # -- model --------------------------------------------------------------------------

    @property
    def loaded_spec(self) -> LoadSpec | None:
        model = self._model
        return model.spec if model is not None else None

    def load(self, spec: LoadSpec) -> float:
        """Make ``spec`` the loaded model (no-op if it is). Returns seconds spent loading."""

        def do_load() -> float:
            if self._model is not None and self._model.spec == spec:
                return 0.0
            if self._model is not None:
                self._model.close()
                self._model = None
            started = time.perf_counter()
            self._model = LoadedModel(spec)
            elapsed = time.perf_counter() - started
            log.info(
                "loaded %s in %.2f s (ctx %d, threads %d, gpu layers %d)",
                spec.model_id,
                elapsed,
                spec.n_ctx,
                spec.n_threads,
                spec.n_gpu_layers,
            )
            return elapsed

        task = self.submit(do_load)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return float(task.result)

    def stream(
        self, tokens: list[int], params: SamplingParams, ctx: JobContext, started: float
    ) -> Iterator[StreamEvent]:
        """Generate on the lane; yields text chunks, then one ``GenerationDone``.

        If the consumer stops iterating early, generation is cancelled at the next token.
        """
        events: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        task = self.submit(lambda: self._generate(tokens, params, ctx, started, events.put))
        finished = False
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationDone):
                    finished = True
                    return
        finally:
            if not finished:
                ctx.cancel("stream closed")
            task.done.wait()

    def _generate(
        self,
        tokens: list[int],
        params: SamplingParams,
        ctx: JobContext,
        started: float,
        put: Callable[[Any], None],
    ) -> None:
        try:
            if self._model is None:
                raise OperationFailed("no model is loaded")
            self._model.generate(tokens, params, ctx, started, put)
        except BaseException as exc:
            put(exc)

    def close(self) -> None:
        """Unload the model and end the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._tasks.put(_STOP)
            thread.join(timeout=30)
        self._thread = None
