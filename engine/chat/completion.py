"""Stateless completions: a list of messages (or raw text) in, an answer out, nothing kept.

What the OpenAI-compatible server runs (``engine.server``): the caller sends the whole
conversation with every request, so nothing is read from or written to Bastion's history.
The model, the chat template and the context window are handled as in a chat turn
(``engine.chat.session``); stop sequences end the answer on the parent's side, where the
text is, and cancel the rest of the generation at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.chat.templates import ChatMessage
from engine.errors import ContextOverflow, InvalidInput
from engine.jobs import JobContext
from engine.models.runtime import GenerationDone, SamplingParams, StreamEvent

if TYPE_CHECKING:
    from engine.chat.session import ChatService
    from engine.citation import Citation
    from engine.rag.grounding import Grounding

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Completion:
    """One answer, with the figures an API reports."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "no_sources"
    ttft_s: float | None
    total_s: float
    citations: tuple[Citation, ...] = ()


class StopFilter:
    """Holds back text that may be the start of a stop sequence; finds the first one.

    ``feed`` returns the text that is safe to pass on; once a stop sequence is seen,
    ``stopped`` is set and nothing after it is ever passed on.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = 0  # the longest tail of buffer that begins some stop sequence
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _split(messages: Sequence[ChatMessage]) -> tuple[str | None, list[ChatMessage], ChatMessage]:
    """The system text (all system messages, joined), the history, and the last user turn."""
    if not messages:
        raise InvalidInput("messages is empty", hint="send at least one user message")
    for m in messages:
        if m.role not in ROLES:
            raise InvalidInput(f"unknown message role {m.role!r}", hint=f"use one of {ROLES}")
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    rest = [m for m in messages if m.role != "system"]
    if not rest or rest[-1].role != "user":
        raise InvalidInput("the last message must be the user's")
    return system, rest[:-1], rest[-1]


def complete_messages(
    service: ChatService,
    model_id: str,
    messages: Sequence[ChatMessage],
    sampling: SamplingParams,
    *,
    stop: Sequence[str] = (),
    ctx: JobContext | None = None,
    on_text: Callable[[str], None] | None = None,
    grounding: Grounding | None = None,
) -> Completion:
    """Answer the last user message of ``messages`` with ``model_id``.

    With ``grounding``, the answer comes from its passages (the sources go into the
    system prompt, and the result carries the citations), or, when retrieval found
    nothing usable, is its canned answer without asking the model.

    Raises:
        InvalidInput: bad messages; NotFound: unknown model; ContextOverflow: the prompt
        alone does not fit; ModelCrashed: the model host died.
    """
    ctx = ctx or JobContext()
    system, history, last = _split(messages)
    entry, _ = service.prepare(model_id)
    if grounding is not None and grounding.canned_answer is not None:
        if on_text is not None:
            on_text(grounding.canned_answer)
        return Completion(
            grounding.canned_answer,
            entry.id,
            0,
            0,
            "no_sources",
            None,
            0.0,
            tuple(grounding.citations),
        )
    spec = service.spec_for(entry)
    lane = service.lane

    def count(text: str) -> int:
        if entry.remote:
            return len(text) // 4 + 1
        return len(lane.tokenize(text, False))

    if grounding is not None:
        budget = spec.n_ctx - min(sampling.max_tokens, spec.n_ctx // 4) - 64 - count(last.content)
        system = grounding.system_prompt(count, budget, system)
    fitted = service.fit(entry, spec, system, history, last.content, sampling)
    prefix = grounding.notice + "\n\n" if grounding is not None and grounding.notice else ""
    started = time.perf_counter()
    events = service.events(entry, fitted, sampling, ctx, started, stop)
    citations = tuple(grounding.citations) if grounding is not None else ()
    return _run(entry.id, events, len(fitted.tokens), stop, on_text, prefix, citations, started)


def complete_text(
    service: ChatService,
    model_id: str,
    prompt: str | list[int],
    sampling: SamplingParams,
    *,
    stop: Sequence[str] = (),
    ctx: JobContext | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    """Continue ``prompt`` as it is (no chat template): the legacy completions API. Token
    ids are used as they are (no BOS added); text is tokenized as the model does."""
    entry, _ = service.prepare(model_id)
    ctx = ctx or JobContext()
    started = time.perf_counter()
    if entry.remote:
        if not isinstance(prompt, str):
            raise InvalidInput(f"{entry.id} is a remote model: send its prompt as text")
        events = service.remote(entry).stream(
            entry.remote["model"], {"prompt": prompt}, sampling, ctx, started, stop=stop
        )
        return _run(entry.id, events, 0, stop, on_text, "", (), started)
    spec = service.spec_for(entry)
    add_bos = entry.metadata.get("tokenizer.ggml.add_bos_token", True) is not False
    tokens = service.lane.tokenize(prompt, add_bos) if isinstance(prompt, str) else prompt
    if not tokens:
        raise InvalidInput("the prompt has no tokens")
    if len(tokens) >= spec.n_ctx:
        raise ContextOverflow(
            f"the prompt is {len(tokens):,} tokens; {entry.id}'s context holds {spec.n_ctx:,}"
        )
    events = service.lane.stream(tokens, sampling, ctx, started)
    return _run(entry.id, events, len(tokens), stop, on_text, "", (), started)


def _run(
    model: str,
    events: Iterator[StreamEvent],
    prompt_tokens: int,
    stop: Sequence[str],
    on_text: Callable[[str], None] | None,
    prefix: str,
    citations: tuple[Citation, ...],
    started: float,
) -> Completion:
    stops = StopFilter(stop)
    pieces = [prefix] if prefix else []
    if prefix and on_text is not None:
        on_text(prefix)
    done: GenerationDone | None = None
    produced = 0
    try:
        for event in events:
            if isinstance(event, GenerationDone):
                done = event
                break
            produced += 1
            text = stops.feed(event.text)
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)
            if stops.stopped:
                break  # leaving the stream cancels the generation at its next token
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    tail = stops.flush()
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    total = time.perf_counter() - started
    if done is None:  # ended by a stop sequence: the pieces so far are its tokens
        return Completion(
            "".join(pieces), model, prompt_tokens, produced, "stop", None, total, citations
        )
    reason = {"stop": "stop", "cancelled": "cancelled"}.get(done.stop_reason, "length")
    return Completion(
        "".join(pieces),
        model,
        done.prompt_tokens or prompt_tokens,
        done.completion_tokens,
        reason,
        done.ttft_s,
        done.total_s,
        citations,
    )


class ModelGate:
    """Lets requests for the loaded model run together, and a request for another model in
    only once those have ended (the host holds one model; switching under a running
    request would answer it with the wrong model)."""

    def __init__(self) -> None:
        import threading

        self._cond = threading.Condition()
        self._model: str | None = None
        self._running = 0

    def enter(self, model: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._running == 0 or self._model == model)
            self._model = model
            self._running += 1

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()
