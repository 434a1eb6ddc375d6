"""What a chat turn takes and gives: the request, the result, and the audit sink it reports to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engine.models.runtime import SamplingParams

if TYPE_CHECKING:
    from engine.citation import Citation


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


class AuditSink(Protocol):
    """Where every finished chat turn is reported, for the user's audit log.

    The sink decides whether to keep it: the engine passes
    ``AuditLog(home).record_answer``, which writes only while the ``audit_log`` setting
    is on. The arguments are plain values, so that the audit log needs nothing from
    ``engine.chat`` and the chat service nothing from ``engine.privacy`` (a test keeps
    the two apart). What it returns is ignored.
    """

    def __call__(
        self,
        *,
        model: str,
        prompt: str,
        answer: str,
        conversation_id: int,
        message_id: int,
        stop_reason: str,
        system: str | None,
        collection: str | None,
    ) -> object: ...
