"""A loaded llama.cpp model and the types of a generation: what the model host runs.

``LoadedModel`` lives only in the model host process (``engine.models.host``) and in the
self-test's probe (``engine.models.selftest``): never in the app, the CLI or the server,
where a native crash would take the user's work with it. The parent side is the lane
(``engine.models.lane``).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput, ModelLoadError
from engine.jobs import JobContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how a model is loaded; a new spec means a reload."""

    model_id: str
    path: str
    n_ctx: int
    n_threads: int
    n_gpu_layers: int
    lora_path: str | None = None
    # Generations run together (continuous batching, engine.models.batching); 1: one at
    # a time, as the desktop and the CLI need.
    parallel: int = 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    # The answer must match this JSON schema (JSON text; llama.cpp grammar made from it).
    json_schema: str | None = None


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

# The configurations the self-test tries, safest last. "default" is llama.cpp's own;
# "no-repack" turns off the extra weight buffer types (weights repacked at load for the
# CPU's wide kernels, AMX among them), which crash on some virtualised Intel Xeons
# (llama.cpp issue 20824) and are the usual suspect when a build misbehaves.
RUNTIME_CONFIGS = ("default", "no-repack")
_DISABLED = {"no-repack": ("repacked weight buffers (extra buffer types, AMX among them)",)}
_PARAMS_LOCK = threading.Lock()


def disabled_by(config: str) -> tuple[str, ...]:
    """What ``config`` turns off, in words (empty for the default)."""
    return _DISABLED.get(config, ())


class _NoChatFormatter:
    """Stands in for llama-cpp-python's ``Jinja2ChatFormatter`` while a model loads.

    ``Llama`` compiles every chat template in the GGUF at load, in a Jinja sandbox that
    folds constants: a template holding ``{{ 'x' * 10**10 }}`` builds ten gigabytes there
    (the model host was OOM-killed after 90 s). Bastion never uses those handlers -- it
    renders templates itself, bounded (``engine.chat.templates``) -- so none is compiled.
    """

    def __init__(self, **_: object) -> None:
        pass

    def to_chat_handler(self) -> Callable[..., object]:
        def refuse(**_: object) -> object:
            raise RuntimeError("Bastion renders chat templates itself")

        return refuse


@contextlib.contextmanager
def _loading(config: str, parallel: int = 1, templates: bool = False) -> Iterator[None]:
    """While inside, ``llama_cpp.Llama`` loads as ``config`` says, compiling no template
    (unless ``templates``).

    ``Llama`` does not take ``use_extra_bufts``; it builds its parameters from
    ``llama_model_default_params`` inside the constructor, so that function is wrapped
    for the duration of one load (in the model host, which loads one model at a time).
    Both replacements are looked up by ``llama_cpp.llama`` at each call.
    """
    import llama_cpp.llama_chat_format
    import llama_cpp.llama_cpp

    bindings: Any = llama_cpp.llama_cpp
    formats: Any = llama_cpp.llama_chat_format
    original_params = bindings.llama_model_default_params
    original_context = bindings.llama_context_default_params
    original_formatter = formats.Jinja2ChatFormatter

    def params():  # type: ignore[no-untyped-def]
        p = original_params()
        p.use_extra_bufts = config != "no-repack"
        return p

    def context():  # type: ignore[no-untyped-def]
        # Several sequences in one context, sharing one KV cache (continuous batching).
        p = original_context()
        p.n_seq_max = parallel
        p.kv_unified = True
        return p

    with _PARAMS_LOCK:
        if not templates:
            formats.Jinja2ChatFormatter = _NoChatFormatter
        if config != "default":
            bindings.llama_model_default_params = params
        if parallel > 1:
            bindings.llama_context_default_params = context
        try:
            yield
        finally:
            bindings.llama_model_default_params = original_params
            bindings.llama_context_default_params = original_context
            formats.Jinja2ChatFormatter = original_formatter


def plain_llama(model_path: str, **kwargs: Any) -> Any:
    """llama-cpp-python's own ``Llama`` with its own chat handling, loaded in the
    configuration the self-test passed on this machine: the reference that tests and
    benchmarks compare Bastion with. Loaded as the library loads by default, it dies with
    SIGILL on CPUs where the repacked (AMX) kernels fault (a virtualised Xeon here).
    """
    import llama_cpp

    from engine.models.lane import selftest_config

    with _loading(selftest_config(Path(model_path)), templates=True):
        return llama_cpp.Llama(model_path=model_path, **kwargs)


def _grammar(schema: str) -> Any:
    """A llama.cpp grammar that only lets through JSON matching ``schema``."""
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except Exception as exc:  # a schema the converter refuses, in whatever way it does
        raise InvalidInput(
            f"the JSON schema can't be turned into a grammar: {exc}".splitlines()[0][:300]
        ) from exc


class LoadedModel:
    """A llama.cpp model in this process. Use it from one thread at a time."""

    def __init__(self, spec: LoadSpec, config: str = "default") -> None:
        import llama_cpp

        if config not in RUNTIME_CONFIGS:
            raise ValueError(f"unknown runtime configuration {config!r}")
        self.spec = spec
        self.config = config
        try:
            with _loading(config, spec.parallel):
                self.llm = llama_cpp.Llama(
                    model_path=spec.path,
                    # Batched: a window for each sequence, in one cache they share.
                    n_ctx=spec.n_ctx * spec.parallel,
                    n_threads=spec.n_threads,
                    n_threads_batch=spec.n_threads,
                    n_gpu_layers=spec.n_gpu_layers,
                    lora_path=spec.lora_path,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError, MemoryError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load model {spec.model_id}: {exc}",
                hint="the file may use an architecture this llama.cpp build does not support",
            ) from exc
        self.n_ctx = self.llm.n_ctx() // spec.parallel  # one sequence's window
        vocab = getattr(getattr(self.llm, "_model", None), "vocab", None)
        self._is_eog: Callable[[int], bool]
        if vocab is not None and hasattr(llama_cpp, "llama_vocab_is_eog"):
            self._is_eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        else:
            eos = self.llm.token_eos()
            self._is_eog = lambda tok: tok == eos

    def special_tokens(self) -> tuple[str, str]:
        """The text of the BOS and EOS tokens (chat templates write them)."""
        return self.token_text(self.llm.token_bos()), self.token_text(self.llm.token_eos())

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
            # A seeded request must give the same answer twice: evaluate the whole prompt
            # instead of reusing the cache of the previous one, whose logits differ in the
            # last bits (another batch shape) and can flip a near tie.
            self.llm.reset()  # type: ignore[no-untyped-call]
        grammar = _grammar(params.json_schema) if params.json_schema else None
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
                grammar=grammar,
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

    def check_tokens(self, tokens: list[int]) -> None:
        """Refuse ids outside the vocabulary (llama.cpp would abort on them, not fail)."""
        n_vocab = self.llm.n_vocab()
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidInput(f"token id {bad} is not in the vocabulary (0 to {n_vocab - 1})")

    def pieces(self, tokens: list[int]) -> list[str]:
        """The text each token adds, decoded as a stream: a character split over several
        tokens comes with the token that completes it, so the pieces join into the text."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = [decoder.decode(self.llm.detokenize([t], special=True)) for t in tokens]
        if pieces:
            pieces[-1] += decoder.decode(b"", final=True)
        return pieces

    def _evaluate(self, window: list[int]) -> Iterator[tuple[int, Any]]:
        """Evaluate ``window`` from an empty cache, in batches with the logits of every
        position; yields (offset of the batch in ``window``, its logits: one row per
        token, valid until the next step). The cache is left empty."""
        import llama_cpp as ll
        import numpy as np

        lctx = self.llm._ctx.ctx
        n_vocab = self.llm.n_vocab()
        n_batch = int(ll.llama_n_batch(lctx))
        memory = ll.llama_get_memory(lctx)
        batch = ll.llama_batch_init(n_batch, 0, 1)
        try:
            ll.llama_memory_clear(memory, True)
            for first in range(0, len(window), n_batch):
                part = window[first : first + n_batch]
                for i, token in enumerate(part):
                    batch.token[i], batch.pos[i] = token, first + i
                    batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, 0, True
                batch.n_tokens = len(part)
                if ll.llama_decode(lctx, batch) != 0:
                    raise ModelLoadError("llama.cpp could not evaluate the text")
                yield (
                    first,
                    np.ctypeslib.as_array(ll.llama_get_logits(lctx), shape=(len(part), n_vocab)),
                )
        finally:
            ll.llama_batch_free(batch)
            self.llm.reset()  # type: ignore[no-untyped-call]
            ll.llama_memory_clear(memory, True)

    def perplexity(self, tokens: list[int]) -> tuple[int, float]:
        """Mean negative log-likelihood of each token given those before it.

        The text is cut into windows of the context's length, each evaluated from an
        empty cache (as llama.cpp's own perplexity tool does, without its overlap), in
        batches with the logits of every position; every token but a window's first is
        scored. Returns (tokens scored, mean NLL in nats).
        """
        import numpy as np

        total, scored = 0.0, 0
        for start in range(0, len(tokens), self.n_ctx):
            window = tokens[start : start + self.n_ctx]
            if len(window) < 2:
                break
            for first, logits in self._evaluate(window):
                targets = np.array(window[first + 1 : first + 1 + len(logits)])
                rows = len(targets)
                if rows == 0:
                    continue
                part = logits[:rows]
                top = part.max(axis=1)
                lse = top + np.log(np.exp(part - top[:, None]).sum(axis=1))
                total += float((lse - part[np.arange(rows), targets]).sum())
                scored += rows
        return scored, (total / scored if scored else float("nan"))

    def score(self, tokens: list[int], top: int) -> dict[str, Any]:
        """The log-probability of each token given those before it, in one window.

        Returns ``pieces`` (each token's text, as ``pieces`` makes it), ``logprobs`` (one
        per token but the first, in nats) and ``top``: at each position, the ``top`` most
        likely next tokens (at least one) as ``[id, text, logprob]``, best first -- the
        last position's are the tokens that would follow the prompt. A token's logprob and
        its entry among the top ones are the same number, so a greedy token compares equal.
        """
        import numpy as np

        if not tokens:
            raise InvalidInput("there are no tokens to score")
        if len(tokens) > self.n_ctx:
            raise InvalidInput(f"{len(tokens)} tokens do not fit in the {self.n_ctx}-token context")
        self.check_tokens(tokens)
        k = max(1, top)
        logprobs: list[float] = []
        best: list[list[list[Any]]] = []
        for first, logits in self._evaluate(tokens):
            peak = logits.max(axis=1)
            lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
            lp = logits - lse[:, None]
            targets = np.array(tokens[first + 1 : first + 1 + len(lp)], dtype=np.int64)
            logprobs += lp[np.arange(len(targets)), targets].tolist()
            if k == 1:
                ids = lp.argmax(axis=1)[:, None]
            else:
                ids = np.argpartition(-lp, k - 1, axis=1)[:, :k]
                order = np.argsort(-np.take_along_axis(lp, ids, axis=1), axis=1)
                ids = np.take_along_axis(ids, order, axis=1)
            values = np.take_along_axis(lp, ids, axis=1)
            best += [
                [[i, self.token_text(i), v] for i, v in zip(row_ids, row_values, strict=True)]
                for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
            ]
        return {"pieces": self.pieces(tokens), "logprobs": logprobs, "top": best}

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
