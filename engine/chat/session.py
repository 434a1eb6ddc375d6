"""One chat turn: pick the model, fit the conversation, stream the answer, keep it on disk."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.chat.context import FittedPrompt, fit_messages
from engine.chat.templates import ChatMessage, ChatTemplate
from engine.errors import InvalidInput, ModelCrashed, OperationFailed
from engine.jobs import JobContext
from engine.models import hardware
from engine.models.lane import ModelLane
from engine.models.registry import ModelEntry, ModelRegistry, ModelSettings
from engine.models.runtime import GenerationDone, LoadSpec, SamplingParams
from engine.privacy.audit import AuditLog
from engine.store.conversations import Conversation, ConversationStore

if TYPE_CHECKING:
    from engine.rag.grounding import Citation, Grounding

log = logging.getLogger(__name__)

# Context used when a model does not say or the user has not chosen: enough for long
# conversations, small enough that the KV cache of a 7B model stays in a laptop's memory.
DEFAULT_CONTEXT = 4096
# How often a streaming answer is written to the database, so that a crash or kill loses
# at most this much of it.
SAVE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    model_id: str | None = None
    conversation_id: int | None = None
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    collection: str | None = None  # answer from this document collection, with citations
    k: int = 6  # passages retrieved from the collection


@dataclass(frozen=True)
class ChatResult:
    answer: str
    model: str
    conversation_id: int
    message_id: int
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float | None
    ttft_s: float | None
    total_s: float
    load_s: float
    stop_reason: str
    dropped_messages: int
    citations: tuple[Citation, ...] = ()

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "cancelled"

    def to_json(self) -> dict[str, Any]:
        """The contract's ``chat --json`` document, plus timing details."""
        return {
            "answer": self.answer,
            "model": self.model,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "tokens_per_second": self.tokens_per_second,
            "time_to_first_token_s": self.ttft_s,
            "stop_reason": self.stop_reason,
            "interrupted": self.interrupted,
            "dropped_messages": self.dropped_messages,
            "citations": [c.to_public() for c in self.citations],
        }


def load_spec_for(entry: ModelEntry) -> LoadSpec:
    """How to load ``entry`` here: its overrides where set, automatic choices otherwise."""
    s = entry.settings
    n_ctx = s.context or min(entry.context_length or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if s.gpu_layers is not None:
        gpu_layers = s.gpu_layers
    elif hardware.gpu_offload_supported():
        from engine.models.gguf_info import read_gguf_info

        gpu_layers = hardware.auto_gpu_layers(
            read_gguf_info(Path(entry.path)), n_ctx, hardware.detect()
        )
    else:
        gpu_layers = 0
    return LoadSpec(
        model_id=entry.id,
        path=entry.path,
        n_ctx=n_ctx,
        n_threads=s.threads or hardware.physical_cores(),
        n_gpu_layers=gpu_layers,
        lora_path=entry.adapter,
    )


class ChatService:
    """Runs chat turns against the model lane and records them."""

    def __init__(
        self,
        lane: ModelLane,
        models: ModelRegistry,
        store: ConversationStore,
        audit: AuditLog | None = None,
    ) -> None:
        self._lane = lane
        self._models = models
        self._store = store
        # Without one given, the audit log lives in the home that holds the database.
        self._audit = audit or AuditLog(store._db.path.parent)
        self._templates: dict[LoadSpec, tuple[ChatTemplate, bool]] = {}
        self._specs: dict[tuple[str, str, str | None, ModelSettings], LoadSpec] = {}

    def prepare(self, model_id: str | None) -> tuple[ModelEntry, float]:
        """Load a model ahead of the first question. Returns it and the seconds spent."""
        entry = self._models.get(model_id or self._models.default_id())
        return entry, self._lane.load(self._spec(entry))

    def _spec(self, entry: ModelEntry) -> LoadSpec:
        """The load spec of ``entry``, decided once per process and settings.

        Deciding again would re-read the header and ask the GPU for its free memory --
        which the loaded model itself has reduced, so the answer would differ and force a
        reload on every message.
        """
        key = (entry.id, entry.path, entry.adapter, entry.settings)
        if key not in self._specs:
            self._specs[key] = load_spec_for(entry)
        return self._specs[key]

    def _template(self, entry: ModelEntry, spec: LoadSpec) -> tuple[ChatTemplate, bool]:
        """The chat template and whether to add BOS when tokenizing (cached per model)."""
        if spec not in self._templates:
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
        the model is not asked and the answer says why.

        Raises:
            InvalidInput: empty prompt; NotFound: unknown model or conversation;
            ContextOverflow: the prompt alone does not fit; Cancelled: cancelled before
            generation started (nothing was written).
        """
        ctx = ctx or JobContext()
        prompt = request.prompt.strip()
        if not prompt:
            raise InvalidInput("the prompt is empty", hint="type a question")
        conversation = None
        if request.conversation_id is not None:
            conversation = self._store.get(request.conversation_id)
        model_id = request.model_id or (conversation.model if conversation else None)
        entry, load_s = self.prepare(model_id)
        ctx.check_cancelled()
        # Time to first token is counted from here: loading is reported apart (load_s).
        started = time.perf_counter()
        spec = self._spec(entry)
        system_text = request.system
        if system_text is None and conversation is not None:
            system_text = conversation.system_prompt
        history = []
        if conversation is not None:
            history = [
                ChatMessage(m.role, m.content)
                for m in self._store.messages(conversation.id)
                if m.role in ("user", "assistant") and m.content.strip()
            ]
        if grounding is not None and grounding.canned_answer is not None:
            canned = self._canned(
                entry, conversation, system_text, prompt, grounding, on_text, load_s
            )
            self._audit.record_turn(canned, prompt, system_text, request.collection)
            return canned
        model_system = system_text
        if grounding is not None:
            model_system = self._grounded_system(
                entry, spec, prompt, system_text, grounding, request.sampling
            )
        fitted = self._fit(entry, spec, model_system, history, prompt, request.sampling)
        if fitted.dropped and on_notice is not None:
            on_notice(
                f"the conversation is longer than {entry.id}'s {spec.n_ctx}-token context: "
                f"the {fitted.dropped} oldest message(s) were left out of this answer"
            )

        if conversation is None:
            conversation = self._store.create(model=entry.id, system_prompt=system_text)
        self._store.add_message(
            conversation.id, "user", prompt, model=entry.id, prompt_tokens=len(fitted.tokens)
        )
        # The answer is recorded as interrupted until it is complete.
        answer_id = self._store.add_message(
            conversation.id, "assistant", "", model=entry.id, interrupted=True
        ).id
        prefix = ""
        if grounding is not None and grounding.notice:
            prefix = grounding.notice + "\n\n"
            if on_text is not None:
                on_text(prefix)
        try:
            answer, done = self._stream(
                answer_id, fitted.tokens, request.sampling, ctx, started, on_text, prefix
            )
        except ModelCrashed as exc:
            raise ModelCrashed(
                f"{exc.message}; the partial answer is kept in conversation "
                f"{conversation.id}, marked interrupted",
                hint=exc.hint,
                conversation_id=conversation.id,
            ) from None
        citations = tuple(grounding.citations) if grounding is not None else ()
        if citations:
            self._store.set_citations(answer_id, [c.to_public() for c in citations])
        self._store.update_message(
            answer_id,
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
        result = ChatResult(
            answer=answer,
            model=entry.id,
            conversation_id=conversation.id,
            message_id=answer_id,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            tokens_per_second=done.tokens_per_second,
            ttft_s=done.ttft_s,
            total_s=done.total_s,
            load_s=load_s,
            stop_reason=done.stop_reason,
            dropped_messages=fitted.dropped,
            citations=citations,
        )
        self._audit.record_turn(result, prompt, system_text, request.collection)
        return result

    def _grounded_system(
        self,
        entry: ModelEntry,
        spec: LoadSpec,
        prompt: str,
        user_system: str | None,
        grounding: Grounding,
        sampling: SamplingParams,
    ) -> str:
        """The system prompt with as many sources as the context leaves room for."""

        def count(text: str) -> int:
            return len(self._lane.tokenize(text, False))

        reserve = min(sampling.max_tokens, spec.n_ctx // 4)
        # Template markers and the question take the rest; 64 tokens of slack for markers.
        budget = spec.n_ctx - reserve - count(prompt) - 64
        return grounding.system_prompt(count, budget, user_system)

    def _canned(
        self,
        entry: ModelEntry,
        conversation: Conversation | None,
        system_text: str | None,
        prompt: str,
        grounding: Grounding,
        on_text: Callable[[str], None] | None,
        load_s: float,
    ) -> ChatResult:
        """Record a question that retrieval says cannot be answered, with the reason."""
        answer = grounding.canned_answer or ""
        if conversation is None:
            conversation = self._store.create(model=entry.id, system_prompt=system_text)
        self._store.add_message(conversation.id, "user", prompt, model=entry.id)
        message = self._store.add_message(
            conversation.id, "assistant", answer, model=entry.id, completion_tokens=0
        )
        citations = tuple(grounding.citations)
        if citations:
            self._store.set_citations(message.id, [c.to_public() for c in citations])
        if on_text is not None:
            on_text(answer)
        return ChatResult(
            answer=answer,
            model=entry.id,
            conversation_id=conversation.id,
            message_id=message.id,
            prompt_tokens=0,
            completion_tokens=0,
            tokens_per_second=None,
            ttft_s=None,
            total_s=0.0,
            load_s=load_s,
            stop_reason="no_sources",
            dropped_messages=0,
            citations=citations,
        )

    def complete(
        self, model_id: str, prompt: str, max_tokens: int = 96, ctx: JobContext | None = None
    ) -> str:
        """One greedy answer to ``prompt`` that is not saved (used to compare models)."""
        entry, _ = self.prepare(model_id)
        spec = self._spec(entry)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
        fitted = self._fit(entry, spec, None, [], prompt, sampling)
        pieces = [
            event.text
            for event in self._lane.stream(
                fitted.tokens, sampling, ctx or JobContext(), time.perf_counter()
            )
            if not isinstance(event, GenerationDone)
        ]
        return "".join(pieces).strip()

    def _fit(
        self,
        entry: ModelEntry,
        spec: LoadSpec,
        system_text: str | None,
        history: list[ChatMessage],
        prompt: str,
        sampling: SamplingParams,
    ) -> FittedPrompt:
        template, add_bos = self._template(entry, spec)

        def encode(messages: list[ChatMessage]) -> list[int]:
            text = template.render(messages)
            skip_bos = bool(template.bos_token) and text.startswith(template.bos_token)
            return self._lane.tokenize(text, add_bos and not skip_bos)

        system = ChatMessage("system", system_text) if system_text else None
        reserve = min(sampling.max_tokens, spec.n_ctx // 4)
        return fit_messages(
            system, history, ChatMessage("user", prompt), encode, spec.n_ctx, reserve
        )

    def _stream(
        self,
        answer_id: int,
        tokens: list[int],
        sampling: SamplingParams,
        ctx: JobContext,
        started: float,
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
            for event in self._lane.stream(tokens, sampling, ctx, started):
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
