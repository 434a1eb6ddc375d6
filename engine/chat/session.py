"""One chat turn: pick the model, fit the conversation, stream the answer, keep it on disk."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.chat import sandbox
from engine.chat.context import FittedPrompt, fit_messages
from engine.chat.loading import LoadSpecs
from engine.chat.loading import load_spec_for as load_spec_for  # noqa: PLC0414 (re-exported)
from engine.chat.templates import ChatMessage, ChatTemplate
from engine.chat.types import AuditSink as AuditSink  # noqa: PLC0414 (re-exported)
from engine.chat.types import ChatRequest as ChatRequest  # noqa: PLC0414 (re-exported)
from engine.chat.types import ChatResult as ChatResult  # noqa: PLC0414 (re-exported)
from engine.errors import InvalidInput, ModelCrashed, OperationFailed
from engine.jobs import JobContext
from engine.models.lane import ModelLane
from engine.models.registry import ModelEntry, ModelRegistry
from engine.models.remote import RemoteClient
from engine.models.runtime import GenerationDone, LoadSpec, SamplingParams, StreamEvent
from engine.store.conversations import Conversation, ConversationStore, Message

if TYPE_CHECKING:
    from engine.rag.grounding import Grounding

log = logging.getLogger(__name__)

# A remote model's tokens are counted on its server; here, roughly, by characters.
CHARS_PER_TOKEN = 4

# How often a streaming answer is written to the database, so that a crash or kill loses
# at most this much of it.
SAVE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class _Turn:
    """What a chat turn settled on before its prompt is built, and where its text goes."""

    request: ChatRequest
    prompt: str  # the question, stripped
    system: str | None  # the user's system prompt: the request's, else the conversation's
    conversation: Conversation | None  # None: the question starts a new one
    entry: ModelEntry
    spec: LoadSpec
    load_s: float
    # When the model was ready: time to first token counts from here (loading is load_s).
    started: float
    ctx: JobContext
    on_text: Callable[[str], None] | None


class ChatService:
    """Runs chat turns against the model lane, records them, and reports them to the audit sink."""

    def __init__(
        self,
        lane: ModelLane,
        models: ModelRegistry,
        store: ConversationStore,
        *,
        audit: AuditSink | None = None,
        secret: Callable[[str], str | None] = lambda _name: None,
    ) -> None:
        """``audit`` hears of every finished turn and decides whether to keep it;
        ``secret`` gives a keyring secret by name (a remote model's API key)."""
        self._secret = secret
        self._lane = lane
        self._models = models
        self._store = store
        self._audit = audit
        self._templates: dict[LoadSpec, tuple[ChatTemplate, bool]] = {}
        self._specs = LoadSpecs()

    def prepare(self, model_id: str | None) -> tuple[ModelEntry, float]:
        """Load a model ahead of the first question. Returns it and the seconds spent."""
        entry = self._models.get(model_id or self._models.default_id())
        if entry.remote:
            return entry, 0.0  # served elsewhere: nothing to load here
        return entry, self._lane.load(self._specs.get(entry))

    def remote(self, entry: ModelEntry) -> RemoteClient:
        """The client of a remote model, with its API key from the keyring."""
        assert entry.remote is not None
        secret = entry.remote.get("key_secret")
        return RemoteClient(entry.remote["url"], self._secret(secret) if secret else None, entry.id)

    def events(
        self,
        entry: ModelEntry,
        fitted: FittedPrompt,
        sampling: SamplingParams,
        ctx: JobContext,
        started: float,
        stop: Sequence[str] = (),
    ) -> Iterator[StreamEvent]:
        """The answer's events: from the model host, or from the remote model's server."""
        if entry.remote:
            payload = {
                "messages": [{"role": m.role, "content": m.content} for m in fitted.messages]
            }
            return self.remote(entry).stream(
                entry.remote["model"], payload, sampling, ctx, started, stop=stop
            )
        return self._lane.stream(fitted.tokens, sampling, ctx, started)

    @property
    def lane(self) -> ModelLane:
        return self._lane

    def set_parallel(self, parallel: int) -> None:
        """Load models for ``parallel`` generations at once (continuous batching)."""
        self._specs.set_parallel(parallel)

    def spec_for(self, entry: ModelEntry) -> LoadSpec:
        """How ``entry`` is loaded (after ``prepare``)."""
        return self._specs.get(entry)

    def template_for(self, entry: ModelEntry, spec: LoadSpec) -> tuple[ChatTemplate, bool]:
        """``entry``'s chat template and whether to add BOS (after ``prepare``)."""
        return self._template(entry, spec)

    def _template(self, entry: ModelEntry, spec: LoadSpec) -> tuple[ChatTemplate, bool]:
        """The chat template and whether to add BOS when tokenizing (cached per model)."""
        if spec not in self._templates:
            if entry.chat_template:
                # Its imports overlap with the model's loading, which special_tokens waits for.
                sandbox.prepare_in_background()
            bos, eos = self._lane.special_tokens()
            add_bos = entry.metadata.get("tokenizer.ggml.add_bos_token", True) is not False
            template = ChatTemplate(entry.chat_template, bos, eos, model=entry.id)
            self._templates[spec] = (template, add_bos)
        return self._templates[spec]

    def send(
        self,
        request: ChatRequest,
        ctx: JobContext | None = None,
        on_text: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        grounding: Grounding | None = None,
    ) -> ChatResult:
        """Answer ``request.prompt``, streaming text to ``on_text`` as it is generated.

        The question and the (growing) answer are written to the database before and
        during generation; a cancelled answer is kept with its ``interrupted`` flag set.
        With ``grounding`` (retrieved passages), the model answers from numbered sources
        and the result carries the citations -- or, when retrieval found nothing usable,
        the model is not asked and the answer says why. Every finished turn, cancelled
        and source-less ones too, goes to the audit sink.

        Raises:
            InvalidInput: empty prompt; NotFound: unknown model or conversation;
            ContextOverflow: the prompt alone does not fit; Cancelled: cancelled before
            generation started (nothing was written); ModelCrashed: the model host died
            (the partial answer is kept, and the error names its conversation).
        """
        turn = self._open(request, ctx or JobContext(), on_text)
        if grounding is not None and grounding.canned_answer is not None:
            result = self._answer_without_model(turn, grounding)
        else:
            system, history = self._messages(turn, grounding)
            fitted = self._fit_turn(turn, system, history, on_notice)
            row = self._store_question(turn, fitted)
            answer, done = self._generate(turn, row, fitted, grounding)
            result = self._store_answer(turn, row, answer, done, fitted.dropped, grounding)
        self._report(turn, result)
        return result

    def _open(
        self, request: ChatRequest, ctx: JobContext, on_text: Callable[[str], None] | None
    ) -> _Turn:
        """Check the question, find its conversation and load its model; nothing is written.

        The model is the request's, else the conversation's, else the default.
        """
        prompt = request.prompt.strip()
        if not prompt:
            raise InvalidInput("the prompt is empty", hint="type a question")
        conversation = None
        if request.conversation_id is not None:
            conversation = self._store.get(request.conversation_id)
        model_id = request.model_id or (conversation.model if conversation else None)
        entry, load_s = self.prepare(model_id)
        ctx.check_cancelled()
        started = time.perf_counter()
        system = request.system
        if system is None and conversation is not None:
            system = conversation.system_prompt
        spec = self._specs.get(entry)
        return _Turn(
            request, prompt, system, conversation, entry, spec, load_s, started, ctx, on_text
        )

    def _messages(
        self, turn: _Turn, grounding: Grounding | None
    ) -> tuple[str | None, list[ChatMessage]]:
        """The system prompt the model gets (with the sources, if grounded) and the history."""
        history = []
        if turn.conversation is not None:
            history = [
                ChatMessage(m.role, m.content)
                for m in self._store.messages(turn.conversation.id)
                if m.role in ("user", "assistant") and m.content.strip()
            ]
        system = turn.system
        if grounding is not None:
            system = self._grounded_system(turn, grounding)
        return system, history

    def _grounded_system(self, turn: _Turn, grounding: Grounding) -> str:
        """The system prompt with as many sources as the context leaves room for."""

        def count(text: str) -> int:
            if turn.entry.remote:
                return len(text) // CHARS_PER_TOKEN + 1
            return len(self._lane.tokenize(text, False))

        n_ctx = turn.spec.n_ctx
        reserve = min(turn.request.sampling.max_tokens, n_ctx // 4)
        # Template markers and the question take the rest; 64 tokens of slack for markers.
        budget = n_ctx - reserve - count(turn.prompt) - 64
        return grounding.system_prompt(count, budget, turn.system)

    def _fit_turn(
        self,
        turn: _Turn,
        system: str | None,
        history: list[ChatMessage],
        on_notice: Callable[[str], None] | None,
    ) -> FittedPrompt:
        """The prompt's tokens, telling ``on_notice`` when old messages had to be left out,
        and, at a model's first turn, when ChatML stands in for a template it lacks."""
        sampling = turn.request.sampling
        first = turn.spec not in self._templates
        fitted = self.fit(turn.entry, turn.spec, system, history, turn.prompt, sampling)
        known = self._templates.get(turn.spec)  # none for a remote model
        notice = known[0].notice if known else None
        if first and notice and on_notice is not None:
            on_notice(notice)
        if fitted.dropped and on_notice is not None:
            on_notice(
                f"the conversation is longer than {turn.entry.id}'s {turn.spec.n_ctx}-token "
                f"context: the {fitted.dropped} oldest message(s) were left out of this answer"
            )
        return fitted

    def _conversation_id(self, turn: _Turn) -> int:
        """The turn's conversation, started now when the question opens a new one."""
        if turn.conversation is not None:
            return turn.conversation.id
        return self._store.create(model=turn.entry.id, system_prompt=turn.system).id

    def _store_question(self, turn: _Turn, fitted: FittedPrompt) -> Message:
        """Write the question, and the answer's row, marked interrupted until it is complete."""
        conversation_id = self._conversation_id(turn)
        model = turn.entry.id
        tokens = len(fitted.tokens)
        self._store.add_message(
            conversation_id, "user", turn.prompt, model=model, prompt_tokens=tokens
        )
        return self._store.add_message(
            conversation_id, "assistant", "", model=model, interrupted=True
        )

    def _generate(
        self, turn: _Turn, row: Message, fitted: FittedPrompt, grounding: Grounding | None
    ) -> tuple[str, GenerationDone]:
        """Stream the answer into ``row``, after the grounding's notice if there is one.

        Raises:
            ModelCrashed: the model host died; the partial answer stays in ``row``, marked
                interrupted, and the error names the conversation.
        """
        prefix = ""
        if grounding is not None and grounding.notice:
            prefix = grounding.notice + "\n\n"
            if turn.on_text is not None:
                turn.on_text(prefix)
        sampling = turn.request.sampling
        try:
            events = self.events(turn.entry, fitted, sampling, turn.ctx, turn.started)
            return self._stream(row.id, events, turn.on_text, prefix)
        except ModelCrashed as exc:
            raise ModelCrashed(
                f"{exc.message}; the partial answer is kept in conversation "
                f"{row.conversation_id}, marked interrupted",
                hint=exc.hint,
                conversation_id=row.conversation_id,
            ) from None

    def _store_answer(
        self,
        turn: _Turn,
        row: Message,
        answer: str,
        done: GenerationDone,
        dropped: int,
        grounding: Grounding | None,
    ) -> ChatResult:
        """Write the ended answer (complete or cancelled), its figures and sources."""
        citations = tuple(grounding.citations) if grounding is not None else ()
        if citations:
            self._store.set_citations(row.id, [c.to_public() for c in citations])
        self._store.update_message(
            row.id,
            content=answer,
            completion_tokens=done.completion_tokens,
            ttft_ms=done.ttft_s * 1000 if done.ttft_s is not None else None,
            duration_ms=done.total_s * 1000,
            tokens_per_second=done.tokens_per_second,
            interrupted=done.stop_reason == "cancelled",
        )
        log.info(
            "answer: %d prompt + %d completion tokens, %.1f tok/s, stop=%s",
            done.prompt_tokens,
            done.completion_tokens,
            done.tokens_per_second or 0.0,
            done.stop_reason,
        )
        return ChatResult(
            answer=answer,
            model=turn.entry.id,
            conversation_id=row.conversation_id,
            message_id=row.id,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            tokens_per_second=done.tokens_per_second,
            ttft_s=done.ttft_s,
            total_s=done.total_s,
            load_s=turn.load_s,
            stop_reason=done.stop_reason,
            dropped_messages=dropped,
            citations=citations,
        )

    def _answer_without_model(self, turn: _Turn, grounding: Grounding) -> ChatResult:
        """Record a question that retrieval says cannot be answered, with the reason."""
        answer = grounding.canned_answer or ""
        conversation_id = self._conversation_id(turn)
        model = turn.entry.id
        self._store.add_message(conversation_id, "user", turn.prompt, model=model)
        message = self._store.add_message(
            conversation_id, "assistant", answer, model=model, completion_tokens=0
        )
        citations = tuple(grounding.citations)
        if citations:
            self._store.set_citations(message.id, [c.to_public() for c in citations])
        if turn.on_text is not None:
            turn.on_text(answer)
        return ChatResult(
            answer=answer,
            model=model,
            conversation_id=conversation_id,
            message_id=message.id,
            prompt_tokens=0,
            completion_tokens=0,
            tokens_per_second=None,
            ttft_s=None,
            total_s=0.0,
            load_s=turn.load_s,
            stop_reason="no_sources",
            dropped_messages=0,
            citations=citations,
        )

    def _report(self, turn: _Turn, result: ChatResult) -> None:
        """Tell the audit sink about the finished turn; it keeps it if the user asked."""
        if self._audit is None:
            return
        self._audit(
            model=result.model,
            prompt=turn.prompt,
            answer=result.answer,
            conversation_id=result.conversation_id,
            message_id=result.message_id,
            stop_reason=result.stop_reason,
            system=turn.system,
            collection=turn.request.collection,
        )

    def complete(
        self, model_id: str, prompt: str, max_tokens: int = 96, ctx: JobContext | None = None
    ) -> str:
        """One greedy answer to ``prompt`` that is not saved (used to compare models)."""
        entry, _ = self.prepare(model_id)
        spec = self._specs.get(entry)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
        fitted = self.fit(entry, spec, None, [], prompt, sampling)
        events = self.events(entry, fitted, sampling, ctx or JobContext(), time.perf_counter())
        pieces = [event.text for event in events if not isinstance(event, GenerationDone)]
        return "".join(pieces).strip()

    def fit(
        self,
        entry: ModelEntry,
        spec: LoadSpec,
        system_text: str | None,
        history: list[ChatMessage],
        prompt: str,
        sampling: SamplingParams,
    ) -> FittedPrompt:
        """The prompt's messages (and tokens, for a local model) that fit the window."""
        system = ChatMessage("system", system_text) if system_text else None
        reserve = min(sampling.max_tokens, spec.n_ctx // 4)
        if entry.remote:  # its tokenizer is on its server: count by characters
            return fit_messages(
                system,
                history,
                ChatMessage("user", prompt),
                lambda kept: (
                    [0] * (sum(len(m.content) for m in kept) // CHARS_PER_TOKEN + 8 * len(kept))
                ),
                spec.n_ctx,
                reserve,
            )
        template, add_bos = self._template(entry, spec)

        def encode(messages: list[ChatMessage]) -> list[int]:
            text = template.render(messages)
            skip_bos = bool(template.bos_token) and text.startswith(template.bos_token)
            return self._lane.tokenize(text, add_bos and not skip_bos)

        return fit_messages(
            system, history, ChatMessage("user", prompt), encode, spec.n_ctx, reserve
        )

    def _stream(
        self,
        answer_id: int,
        events: Iterator[StreamEvent],
        on_text: Callable[[str], None] | None,
        prefix: str = "",
    ) -> tuple[str, GenerationDone]:
        """Generate, hand text to ``on_text``, and save the answer every half second.

        ``prefix`` (a notice already shown) is kept at the head of the stored answer.
        """
        pieces: list[str] = [prefix] if prefix else []
        done: GenerationDone | None = None
        last_save = time.monotonic()
        try:
            for event in events:
                if isinstance(event, GenerationDone):
                    done = event
                    continue
                # The model's first piece often starts with a space; the prefix is not its.
                text = event.text if len(pieces) > bool(prefix) else event.text.lstrip()
                if not text:
                    continue
                pieces.append(text)
                if on_text is not None:
                    on_text(text)
                if time.monotonic() - last_save >= SAVE_INTERVAL_S:
                    self._store.update_message(answer_id, content="".join(pieces), interrupted=True)
                    last_save = time.monotonic()
        finally:
            if done is None:  # an error or an interrupt in the middle: keep what we have
                self._store.update_message(answer_id, content="".join(pieces), interrupted=True)
        if done is None:
            raise OperationFailed("generation ended without finishing")
        return "".join(pieces).rstrip(), done
