"""Chat templates: the model's own (from GGUF metadata) first, ChatML when it has none.

Templates render in a bounded sandbox (``engine.chat.sandbox``: time, size and work
limits). Every failure (those bounds, ``raise_exception`` in the template, ``1/0``, a
missing variable) becomes an ``OperationFailed`` naming the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.chat.sandbox import LimitExceeded, TemplateRaised, compile_template, render_bounded
from engine.errors import OperationFailed

# What an error message quotes of an exception's text.
_REASON_CHARS = 200
_HINT = "the template comes from the model's file: use another model, or a fixed file"

# ChatML is the format most small instruct models were tuned on (SmolLM, Qwen, Hermes)
# and degrades gracefully on others: turns stay clearly delimited.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


class ChatTemplate:
    """Renders a list of messages into the prompt text a model expects."""

    def __init__(
        self,
        source: str | None,
        bos_token: str = "",
        eos_token: str = "",
        model: str | None = None,
    ) -> None:
        """
        Args:
            source: the model's template (GGUF ``tokenizer.chat_template``); None or one
                that does not compile means ChatML.
            bos_token: the model's beginning-of-sequence text, as templates expect it.
            eos_token: the model's end-of-sequence text.
            model: the model's id, named in every error the template causes.
        """
        self.from_model = source is not None
        self.source = source if source is not None else CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.model = model
        try:
            self._template = compile_template(self.source)
        except Exception:
            self.from_model = False
            self.source = CHATML
            self._template = compile_template(CHATML)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``.

        Some templates refuse a system message (they call ``raise_exception``); then the
        system prompt is put in front of the first user message instead, which is what
        those models' own chat front-ends do.

        Raises:
            OperationFailed: the template refused the messages, failed, or went past its
                bounds in time or size; the message names the model.
        """
        payload = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._render(payload, add_generation_prompt)
        except TemplateRaised as exc:
            if not payload or payload[0]["role"] != "system" or len(payload) < 2:
                raise self._failure("refused", exc) from exc
            system = payload.pop(0)["content"]
            payload[0] = {**payload[0], "content": f"{system}\n\n{payload[0]['content']}"}
            try:
                return self._render(payload, add_generation_prompt)
            except TemplateRaised as exc2:
                raise self._failure("refused", exc2) from exc2

    def _render(self, payload: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return render_bounded(
                self._template,
                messages=payload,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateRaised:
            raise
        except LimitExceeded as exc:
            raise self._failure("was stopped", exc) from None
        except Exception as exc:  # anything the template does wrong: 1/0, a missing key
            raise self._failure("failed", exc) from exc

    def _failure(self, how: str, exc: BaseException) -> OperationFailed:
        whose = (
            f"the chat template of model {self.model!r}"
            if self.model
            else ("the model's chat template")
        )
        reason = " ".join(str(exc).split())[:_REASON_CHARS]
        if how == "failed":
            reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        if how == "was stopped":
            return OperationFailed(f"{whose} was stopped: {reason}", hint=_HINT)
        return OperationFailed(f"{whose} {how}: {reason}", hint=_HINT if how == "failed" else None)
