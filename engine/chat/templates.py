"""Chat templates: the model's own (from GGUF metadata), rendered as transformers renders it.

Rendering is Hugging Face's (``transformers.utils.chat_template_utils``: the same Jinja
environment, extensions, filters and globals), kept within time, size and work bounds by
``engine.chat.sandbox``, since the template comes from a file anyone can write. What
Bastion adds: a system prompt that a template refuses is merged into the first user
message, and a model whose file has *no* template gets ChatML, with a notice. A template
that exists but cannot be used -- it does not compile, calls ``raise_exception``, passes
a bound, or fails (``1/0``, a missing variable) -- is an ``OperationFailed`` naming the
model, never a quiet switch to ChatML: a prompt in the wrong format makes a model answer
badly with no sign of why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.chat.bounds import LimitExceeded
from engine.chat.sandbox import compile_template, refused, render_bounded
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
            source: the model's template (GGUF ``tokenizer.chat_template``); None means
                the model has none, and ChatML stands in (see ``notice``).
            bos_token: the model's beginning-of-sequence text, as templates expect it.
            eos_token: the model's end-of-sequence text.
            model: the model's id, named in every error the template causes.

        Raises:
            OperationFailed: the model's template does not compile; the message names it.
        """
        self.from_model = source is not None
        self.source = source if source is not None else CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.model = model
        try:
            self._template = compile_template(self.source)
        except Exception as exc:  # a syntax error, or its constants failing as they fold
            raise self._failure("could not be compiled", exc) from exc

    @property
    def notice(self) -> str | None:
        """What the user should be told about this template: None for the model's own."""
        if self.from_model:
            return None
        whose = f"model {self.model!r}" if self.model else "the model"
        return (
            f"{whose} has no chat template in its file: prompts use ChatML, "
            "which may not be the format it was trained on"
        )

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``, byte for byte what transformers'
        ``apply_chat_template`` makes of them with the same BOS and EOS texts (templates
        that read other special tokens, such as ``pad_token``, see them unset).

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
        except _Refused as exc:
            if not payload or payload[0]["role"] != "system" or len(payload) < 2:
                raise self._failure("refused", exc.reason) from exc.reason
            system = payload.pop(0)["content"]
            payload[0] = {**payload[0], "content": f"{system}\n\n{payload[0]['content']}"}
            try:
                return self._render(payload, add_generation_prompt)
            except _Refused as exc2:
                raise self._failure("refused", exc2.reason) from exc2.reason

    def _render(self, payload: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            # The variables transformers passes: no tools or documents is None, not unset.
            return render_bounded(
                self._template,
                messages=payload,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except LimitExceeded as exc:
            raise self._failure("was stopped", exc) from None
        except Exception as exc:  # anything the template does wrong: 1/0, a missing key
            if refused(exc):
                raise _Refused(exc) from exc
            raise self._failure("failed", exc) from exc

    def _failure(self, how: str, exc: BaseException) -> OperationFailed:
        whose = f"the chat template of model {self.model!r}" if self.model else "the chat template"
        reason = " ".join(str(exc).split())[:_REASON_CHARS]
        if how in ("failed", "could not be compiled"):
            reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        return OperationFailed(f"{whose} {how}: {reason}", hint=None if how == "refused" else _HINT)


class _Refused(Exception):
    """The template called ``raise_exception`` (its message is the reason)."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason
