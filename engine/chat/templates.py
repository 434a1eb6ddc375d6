"""Chat templates: the model's own (from GGUF metadata) first, ChatML when it has none."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.errors import OperationFailed

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


class _TemplateException(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateException(message)


@functools.cache
def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Templates come from model files, which anyone can write: a sandbox keeps them from
    # reaching Python internals.
    # The same environment options as Hugging Face's apply_chat_template, which is what
    # template authors test against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """Renders a list of messages into the prompt text a model expects."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.from_model = source is not None
        self.source = source if source is not None else CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _compile(self.source)
        except Exception:
            self.from_model = False
            self.source = CHATML
            self._template = _compile(CHATML)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``.

        Some templates refuse a system message (they call ``raise_exception``); then the
        system prompt is put in front of the first user message instead, which is what
        those models' own chat front-ends do.
        """
        payload = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._render(payload, add_generation_prompt)
        except _TemplateException as exc:
            if not payload or payload[0]["role"] != "system" or len(payload) < 2:
                raise OperationFailed(f"the model's chat template refused: {exc}") from exc
            system = payload.pop(0)["content"]
            payload[0] = {**payload[0], "content": f"{system}\n\n{payload[0]['content']}"}
            try:
                return self._render(payload, add_generation_prompt)
            except _TemplateException as exc2:
                raise OperationFailed(f"the model's chat template refused: {exc2}") from exc2

    def _render(self, payload: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return str(
                self._template.render(
                    messages=payload,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except _TemplateException:
            raise
        except TemplateError as exc:
            raise OperationFailed(f"the model's chat template failed: {exc}") from exc
